#!/usr/bin/env bash
# Static checks of deploy/: the Kubernetes example against the Kubernetes
# schemas, its proxy.toml through `pgnear check`, the alert rules and their
# unit tests, and the dashboard's queries. Each line of output is one check;
# the first that fails stops the run with a non-zero exit.
#
#   bash tests/deploy/run.sh
#   PGNEAR_BIN=target/debug/pgnear bash tests/deploy/run.sh
#
# Environment:
#   PGNEAR_BIN           the pgnear for `pgnear check` (target/release/pgnear,
#                        else target/debug/pgnear)
#   PGNEAR_DEPLOY_CACHE  where the Python venv is kept (~/.cache/pgnear-deploy)
# The names the rules and the dashboard use are checked against a live
# scrape by tests/container/run.sh.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
START_TS=$(date +%s)
say() { printf '==> %s\n' "$*"; }
die() { printf 'tests/deploy/run.sh: %s\n' "$*" >&2; exit 1; }

command -v promtool >/dev/null || die "promtool is required (apt-get install prometheus)"
# shellcheck source=tests/deploy/venv.sh
. "$HERE/venv.sh"
deploy_venv

PGNEAR="${PGNEAR_BIN:-}"
if [ -z "$PGNEAR" ]; then
    for candidate in "$ROOT/target/release/pgnear" "$ROOT/target/debug/pgnear"; do
        [ -x "$candidate" ] && { PGNEAR=$candidate; break; }
    done
fi
[ -n "$PGNEAR" ] && [ -x "$PGNEAR" ] || die "no pgnear binary: build it or set PGNEAR_BIN"

cd "$ROOT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgnear-deploy.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

say "yamllint deploy/"
"$DEPLOY_VENV/bin/yamllint" --strict -c deploy/.yamllint.yml deploy/

# --strict rejects fields the schema does not know (a misspelt key is an
# error, not ignored). The oldest and newest versions the package ships
# that the example is meant for.
for version in 1.28.0 1.37.0; do
    say "kubernetes-validate --strict, Kubernetes $version"
    "$DEPLOY_VENV/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/kubernetes/*.yaml
done

say "the Kubernetes files agree (Secret keys, ports, probes, preStop)"
"$DEPLOY_PY" "$HERE/check.py" manifests "$WORK/proxy.toml"

say "pgnear check on the ConfigMap's proxy.toml ($PGNEAR)"
# The Secret's variables, as the pod's environment has them. The example's
# host names do not resolve here: pgnear check warns, and passes.
APP_PASSWORD=app-secret MONITOR_PASSWORD=monitor-secret "$PGNEAR" check --config "$WORK/proxy.toml"

say "promtool check rules"
promtool check rules deploy/prometheus/pgnear-rules.yml
say "promtool test rules"
promtool test rules deploy/prometheus/pgnear-rules.test.yml

say "dashboard structure and queries"
"$DEPLOY_PY" "$HERE/check.py" dashboard

echo "deploy checks passed in $(( $(date +%s) - START_TS ))s"
