#!/usr/bin/env bash
# End-to-end check of the Docker deployment on this host: real dockerd, real images, the
# compose stack (PostgreSQL, code server, webserver, daemon) and run containers launched by
# the daemon (DockerRunLauncher). Prints one line per step; exits 0 only when every step held.
#
#   bash docker/e2e.sh            # as root (starts dockerd when none runs); ~20-30 min here
#
# Steps: dockerd; base images (local stand-ins made when the official ones are missing);
# wheelhouse (docker/wheelhouse.sh when empty); compose refuses a missing password; build
# (offline from the wheelhouse) and osmium in the image; compose up and health; through the
# webserver's GraphQL API as the UI does: regions helsinki and monaco registered and launched
# (materialize_region, then one run per cell by the launch_region_runs sensor) while the
# daemon is restarted mid-run; two training runs, the first one's container killed mid-run
# (run monitoring fails it, the queue starts the second); monaco again, now with embeddings,
# checked with `s2vec sql` in a container; a one-node change file applied by refresh_sources
# and the refresh_stale_partitions sensor, only Helsinki's partition rewritten;
# compose down -v. Containers, volumes and networks are removed also when a step fails.
#
# Settings (environment): S2VEC_UI_PORT (13000), COMPOSE (docker compose or docker-compose,
# found), S2VEC_E2E_KEEP_DOCKERD=1 keeps a dockerd this script started. Logs: docker/.scratch/.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scratch=$here/.scratch
logs=$scratch/e2e-logs
mkdir -p "$logs"
cd "$here" || exit 2

export COMPOSE_PROJECT_NAME=s2vec
export S2VEC_IMAGE_TAG=e2e
export S2VEC_UI_PORT=${S2VEC_UI_PORT:-13000}
export S2VEC_PROFILE=city
export S2VEC_CHANGES=/data/changes
export DAGSTER_POSTGRES_PASSWORD=${DAGSTER_POSTGRES_PASSWORD:-e2e-$RANDOM$RANDOM}
IMAGE=s2vec-pipeline:$S2VEC_IMAGE_TAG
GQL=(python3 "$here/gql.py" --url "http://127.0.0.1:$S2VEC_UI_PORT/graphql")
HELSINKI_L6=4693
MONACO_L6=12cd
# A tiny MAE, one epoch: the check is the plumbing, not the model (conftest.TINY_MODEL).
TRAIN_CONFIG='{"ops":{"mae_model":{"config":{"epochs":1,"embed_dim":32,"depth":1,"num_heads":4,
"decoder_embed_dim":16,"decoder_depth":1,"decoder_num_heads":2,"batch_size":8}}}}'

stack_up=""
rm -f "$scratch/dockerd.pid"
t_start=$SECONDS

# Inside a step (a subshell): the step's last line says why, and the step fails.
fail() { echo "$*"; exit 1; }

# step NAME COMMAND...: runs the command in a subshell, its output in $logs/NAME.log; prints
# one line (the log's last line), and stops the script when the step fails.
step() {
  local name=$1 t0=$SECONDS
  shift
  if ( "$@" ) > "$logs/$name.log" 2>&1; then
    printf 'ok   %-28s %4d s  %s\n' "$name" $((SECONDS - t0)) "$(tail -n 1 "$logs/$name.log")"
  else
    printf 'FAIL %-28s %4d s  %s (log: %s)\n' "$name" $((SECONDS - t0)) \
      "$(tail -n 1 "$logs/$name.log")" "$logs/$name.log"
    exit 1
  fi
}

compose() { "${COMPOSE_CMD[@]}" "$@"; }

cleanup() {
  local rc=$?
  if [ -n "$stack_up" ]; then
    # Run containers are the launcher's, not compose's: remove them first (they hold the
    # network and the volumes).
    docker ps -aq --filter network=s2vec_network --filter label=dagster/run_id \
      | xargs -r docker rm -f >/dev/null 2>&1
    compose down -v --remove-orphans >"$logs/down.log" 2>&1
    docker volume rm s2vec_data dagster_storage >/dev/null 2>&1
    docker network rm s2vec_network >/dev/null 2>&1
    left=$(docker ps -aq --filter network=s2vec_network; docker volume ls -q \
      --filter name='^(s2vec_data|dagster_storage|s2vec_postgres_data)$')
    if [ -n "$left" ]; then
      echo "FAIL cleanup: left behind: $left" >&2
      rc=1
    else
      echo "ok   cleanup (containers, volumes, network removed)"
    fi
  fi
  started_dockerd=$(cat "$scratch/dockerd.pid" 2>/dev/null)
  if [ -n "$started_dockerd" ] && [ -z "${S2VEC_E2E_KEEP_DOCKERD:-}" ]; then
    kill "$started_dockerd" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    rm -f "$scratch/dockerd.pid"
    echo "ok   dockerd stopped (this script started it)"
  fi
  if [ "$rc" = 0 ]; then
    echo "e2e: every step held in $((SECONDS - t_start)) s"
  else
    echo "e2e: FAILED after $((SECONDS - t_start)) s (logs in $logs)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the steps ------------------------------------------------------------------------------

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then
    echo "dockerd already running"
    return
  fi
  command -v dockerd >/dev/null || fail "no dockerd: apt-get install docker.io"
  dockerd > "$scratch/dockerd.log" 2>&1 &
  echo $! > "$scratch/dockerd.pid"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { echo "dockerd started (log $scratch/dockerd.log)"; return; }
    sleep 1
  done
  fail "dockerd did not answer in 60 s (see $scratch/dockerd.log)"
}

# The official base images when this host has them, else local stand-ins (made when missing).
choose_base_images() {
  standin=""
  if [ -z "${S2VEC_BASE_IMAGE:-}" ]; then
    if docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1; then
      export S2VEC_BASE_IMAGE=python:3.11-slim-bookworm
    else
      export S2VEC_BASE_IMAGE=s2vec-standin/python:3.11-bookworm
      standin=1
    fi
  fi
  if [ -z "${S2VEC_POSTGRES_IMAGE:-}" ]; then
    if docker image inspect postgres:15-bookworm >/dev/null 2>&1; then
      export S2VEC_POSTGRES_IMAGE=postgres:15-bookworm
    else
      export S2VEC_POSTGRES_IMAGE=s2vec-standin/postgres:15-bookworm
      standin=1
    fi
  fi
}

base_images() {
  if [ -n "$standin" ]; then
    bash "$here/standin-images.sh" || return 1
    echo "base $S2VEC_BASE_IMAGE, postgres $S2VEC_POSTGRES_IMAGE: STAND-INS, not the official images"
  else
    echo "base $S2VEC_BASE_IMAGE, postgres $S2VEC_POSTGRES_IMAGE (official, present)"
  fi
}

wheelhouse() {
  if ls "$here"/wheelhouse/*.whl >/dev/null 2>&1; then
    echo "present: $(ls "$here"/wheelhouse/*.whl | wc -l) wheels"
  else
    bash "$here/wheelhouse.sh"
  fi
}

refuses_without_password() {
  local out
  if out=$(env -u DAGSTER_POSTGRES_PASSWORD "${COMPOSE_CMD[@]}" config 2>&1); then
    fail "compose accepted the file without DAGSTER_POSTGRES_PASSWORD"
  fi
  echo "$out"
  grep -q "DAGSTER_POSTGRES_PASSWORD" <<< "$out" || fail "refused, but not for the password"
  echo "refused: $(grep -o 'set DAGSTER_POSTGRES_PASSWORD' <<< "$out" | head -1)"
}

build() {
  compose build s2vec_code || return 1  # one image: the other services use its tag
  docker run --rm --network none "$IMAGE" osmium --version | head -1
}

up_and_healthy() {
  # The change folder exists before the daemon's first observation of the sources.
  docker run --rm --network none -v s2vec_data:/data "$IMAGE" mkdir -p "$S2VEC_CHANGES" \
    || return 1
  compose up -d || return 1
  local deadline=$((SECONDS + 600)) svc cid state all
  while :; do
    all=""
    for svc in postgresql s2vec_code dagster_webserver dagster_daemon; do
      cid=$(compose ps -q "$svc")
      state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
        "$cid" 2>/dev/null || echo missing)
      all+="$svc=$state "
    done
    echo "$all"
    [[ $all != *starting* && $all != *unhealthy* && $all != *missing* ]] && break
    [ $SECONDS -gt $deadline ] && fail "not healthy after 600 s: $all"
    sleep 5
  done
  "${GQL[@]}" ready --timeout 300 || return 1
  echo "healthy: $all"
}

region_config() {  # NAME [BBOX]
  if [ -n "${2:-}" ]; then
    printf '{"ops":{"resolve_region":{"config":{"region":"%s","bbox":"%s"}}}}' "$1" "$2"
  else
    printf '{"ops":{"resolve_region":{"config":{"region":"%s"}}}}' "$1"
  fi
}

container_of() { docker ps -q --filter "label=dagster/run_id=$1"; }

regions_with_daemon_restart() {
  local h m run daemon
  h=$("${GQL[@]}" launch materialize_region --config "$(region_config helsinki \
    60.165,24.935,60.175,24.955)") || return 1
  m=$("${GQL[@]}" launch materialize_region --config "$(region_config monaco \
    43.730,7.415,43.745,7.430)") || return 1
  "${GQL[@]}" wait "$h" --until SUCCESS --timeout 600 || return 1
  "${GQL[@]}" wait "$m" --until SUCCESS --timeout 600 || return 1
  # The sensor launches one partition_pipeline run per cell; restart the daemon while the
  # first is running: it must still end SUCCESS (run monitoring resumes), never stay STARTED.
  local deadline=$((SECONDS + 300))
  while :; do
    run=$("${GQL[@]}" runs --job partition_pipeline --tag s2vec/region=helsinki \
      | awk '$2 == "STARTED" {print $1; exit}')
    [ -n "$run" ] && break
    [ $SECONDS -gt $deadline ] && fail "no region run STARTED in 300 s"
    sleep 2
  done
  daemon=$(compose ps -q dagster_daemon)
  docker restart "$daemon" >/dev/null || return 1
  echo "daemon restarted while run $run was STARTED"
  "${GQL[@]}" wait "$run" --until SUCCESS --timeout 900 || return 1
  "${GQL[@]}" settle --tag s2vec/region=helsinki --count 1 --timeout 900 || return 1
  "${GQL[@]}" settle --tag s2vec/region=monaco --count 1 --timeout 900 || return 1
  echo "regions helsinki ($HELSINKI_L6) and monaco ($MONACO_L6) materialized in run containers;" \
    "run $run SUCCESS across the daemon restart"
}

kill_run_and_queue_moves_on() {
  local a b cid
  a=$("${GQL[@]}" launch train_model --config "$TRAIN_CONFIG") || return 1
  b=$("${GQL[@]}" launch train_model --config "$TRAIN_CONFIG") || return 1
  "${GQL[@]}" wait "$a" --until STARTED --timeout 600 || return 1
  sleep 5  # into the step
  cid=$(container_of "$a")
  [ -n "$cid" ] || fail "no container for run $a"
  [ "$("${GQL[@]}" status "$b")" = QUEUED ] || fail "second training run not QUEUED behind the first"
  docker kill "$cid" >/dev/null || return 1
  echo "killed container $cid of run $a"
  "${GQL[@]}" wait "$a" --until FAILURE --timeout 300 || return 1
  echo "run monitoring marked $a FAILURE"
  "${GQL[@]}" wait "$b" --until STARTED,SUCCESS --timeout 300 || return 1
  "${GQL[@]}" wait "$b" --until SUCCESS --timeout 1200 || return 1
  echo "killed run $a FAILURE; queued run $b then SUCCESS (the model)"
}

in_image() {  # a one-off container of the image on the storage volume, no network
  docker run --rm --network none -v s2vec_data:/data "$IMAGE" "$@"
}

sql_csv() {  # QUERY -> CSV on stdout
  in_image sh -c 's2vec sql --root /data/s2vec "$1" --out /tmp/q.csv >/dev/null && cat /tmp/q.csv' \
    sh "$1"
}

embeddings() {
  local r out
  "${GQL[@]}" runs --tag s2vec/region=monaco | cut -f1 > "$logs/monaco-before.ids" || return 1
  r=$("${GQL[@]}" launch materialize_region --config "$(region_config monaco)") || return 1
  "${GQL[@]}" wait "$r" --until SUCCESS --timeout 600 || return 1
  # The launch_region_runs sensor's new run(s), now with the embeddings (a model exists).
  "${GQL[@]}" settle --tag s2vec/region=monaco --count 1 --timeout 900 \
    --ignore "$logs/monaco-before.ids" || return 1
  out=$(sql_csv "SELECT
      (SELECT count(*) FROM raster_tiles
        WHERE parent_l6 = '$MONACO_L6' AND nonempty_pixels > 0) AS tiles,
      (SELECT count(*) FROM image_embeddings WHERE parent_l6 = '$MONACO_L6') AS images,
      (SELECT count(*) FROM cell_embeddings WHERE parent_l6 = '$MONACO_L6') AS cells,
      (SELECT min(len(embedding)) FROM cell_embeddings WHERE parent_l6 = '$MONACO_L6') AS dmin,
      (SELECT max(len(embedding)) FROM cell_embeddings WHERE parent_l6 = '$MONACO_L6') AS dmax,
      (SELECT count(DISTINCT model_version) FROM cell_embeddings) AS models") || return 1
  echo "$out"
  # One image embedding per raster tile with data, side x side cell embeddings per image,
  # 32-d (the tiny model's width), one model.
  python3 - "$out" <<'EOF' || return 1
import csv, io, math, sys
row = next(csv.DictReader(io.StringIO(sys.argv[1])))
t, i, c, dmin, dmax, m = (int(row[k]) for k in ("tiles", "images", "cells", "dmin", "dmax", "models"))
side = math.isqrt(c // i) if i else 0
assert t > 0 and i == t, f"{i} image embeddings for {t} raster tiles with data"
assert side * side * i == c, f"{c} cell embeddings are not side^2 x {i} images"
assert dmin == dmax == 32 and m == 1, f"width {dmin}..{dmax}, {m} models"
print(f"monaco: {t} tiles -> {i} image and {c} cell embeddings ({side}x{side}), 32-d, 1 model")
EOF
}

partition_files() {  # the data files of both partitions in every table, with mtimes
  in_image sh -c 'cd /data/s2vec && find . -path "*/parent_l6=*" -type f -printf "%p %T@\n" | sort'
}

refresh_one_node() {
  local before after r changed
  # Whatever the sensors still had to do (e.g. the first observation of the sources) ends
  # first; those runs are not the refresh's.
  "${GQL[@]}" settle --tag dagster/sensor_name=refresh_stale_partitions --count 0 --quiet 90 \
    --timeout 900 | cut -f1 > "$logs/refresh-before.ids" || return 1
  before=$(partition_files) || return 1
  # One node: Helsinki railway station (tagged, in no way) 0.004 degrees north, as a new
  # version (the tests' change, test_refresh.py), written into S2VEC_CHANGES.
  docker run --rm -i --network none -v s2vec_data:/data "$IMAGE" python - <<'EOF' || return 1
import importlib.resources, osmium
from xml.sax.saxutils import quoteattr
pbf = importlib.resources.files("s2vec_pipeline") / "data/osm/helsinki.osm.pbf"
for n in osmium.FileProcessor(str(pbf)).with_filter(osmium.filter.IdFilter([25389429])):
    tags = "".join(f"    <tag k={quoteattr(t.k)} v={quoteattr(t.v)}/>\n" for t in n.tags)
    node = (
        f'  <node id="{n.id}" version="{n.version + 1}" timestamp="2019-05-01T00:00:00Z" '
        f'uid="1" user="e2e" changeset="1" lat="{n.location.lat + 0.004:.7f}" '
        f'lon="{n.location.lon:.7f}">\n{tags}  </node>\n'
    )
open("/data/changes/0001.osc", "w").write(
    "<?xml version='1.0' encoding='UTF-8'?>\n<osmChange version=\"0.6\" generator=\"e2e\">\n"
    f"<modify>\n{node}</modify>\n</osmChange>\n"
)
print(node.splitlines()[0].strip())
EOF
  r=$("${GQL[@]}" launch refresh_sources) || return 1
  "${GQL[@]}" wait "$r" --until SUCCESS --timeout 600 || return 1
  # refresh_stale_partitions (every minute) recomputes the stale steps, one per tick.
  "${GQL[@]}" settle --tag dagster/sensor_name=refresh_stale_partitions --count 1 --quiet 150 \
    --timeout 1200 --ignore "$logs/refresh-before.ids" | tee "$logs/refresh-runs.tsv" || return 1
  if awk -v h="$HELSINKI_L6" '$4 != h' "$logs/refresh-runs.tsv" | grep -q .; then
    fail "the refresh ran partitions other than $HELSINKI_L6"
  fi
  after=$(partition_files) || return 1
  if [ "$(grep "parent_l6=$MONACO_L6/" <<< "$before")" != \
       "$(grep "parent_l6=$MONACO_L6/" <<< "$after")" ]; then
    fail "files of the untouched partition $MONACO_L6 changed"
  fi
  changed=$(diff <(grep "parent_l6=$HELSINKI_L6/" <<< "$before") \
    <(grep "parent_l6=$HELSINKI_L6/" <<< "$after") | grep -c '^>')
  [ "$changed" -gt 0 ] || fail "no file of the touched partition $HELSINKI_L6 changed"
  grep -q "osm_features/parent_l6=$HELSINKI_L6/" <(diff <(echo "$before") <(echo "$after")) \
    || fail "osm_features of $HELSINKI_L6 not rewritten"
  echo "refresh: $(wc -l < "$logs/refresh-runs.tsv") runs, all of $HELSINKI_L6; $changed new" \
    "files there, not one file of $MONACO_L6 changed"
}

compose_down() {
  docker ps -aq --filter network=s2vec_network --filter label=dagster/run_id \
    | xargs -r docker rm -f >/dev/null
  compose down -v --remove-orphans || return 1
  docker volume rm s2vec_data dagster_storage >/dev/null 2>&1
  echo "stack, run containers and volumes removed"
}

# --- main -----------------------------------------------------------------------------------
command -v python3 >/dev/null || { echo "e2e.sh: python3 is needed on the host" >&2; exit 2; }
step dockerd ensure_dockerd
if [ -n "${COMPOSE:-}" ]; then
  read -r -a COMPOSE_CMD <<< "$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE_CMD=(docker-compose)
else
  echo "e2e.sh: no Compose: install docker-compose (Debian) or the compose plugin" >&2
  exit 2
fi
# Its volumes are named: an existing stack's data would be deleted by the final down -v.
if docker volume inspect s2vec_data >/dev/null 2>&1; then
  echo "e2e.sh: volume s2vec_data exists (a running s2vec stack?): e2e.sh would delete it;" \
    "run it on a host without one" >&2
  exit 2
fi
echo "ok   compose                         $("${COMPOSE_CMD[@]}" version 2>/dev/null | head -1)"
choose_base_images
step base-images base_images
step wheelhouse wheelhouse
step refuses-without-password refuses_without_password
step build build
stack_up=1  # from here on, the trap takes the stack down
step up-healthy up_and_healthy
step regions-daemon-restart regions_with_daemon_restart
step kill-run-queue-moves-on kill_run_and_queue_moves_on
step embeddings-sql embeddings
step refresh-one-node refresh_one_node
step compose-down compose_down
stack_up=""
