# shellcheck shell=bash
# Sourced by tests/deploy/run.sh and tests/container/run.sh: a Python venv
# with yamllint (and PyYAML, which it brings) and kubernetes-validate,
# whose Kubernetes schemas work offline. Kept between runs in
# PGNEAR_DEPLOY_CACHE (~/.cache/pgnear-deploy). Sets DEPLOY_PY.
DEPLOY_CACHE="${PGNEAR_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgnear-deploy}"
DEPLOY_VENV="$DEPLOY_CACHE/venv"
DEPLOY_PY="$DEPLOY_VENV/bin/python"
deploy_venv() {
    local want="kubernetes-validate==1.37.0 yamllint==1.38.0"
    if [ "$(cat "$DEPLOY_VENV/.pgnear-requirements" 2>/dev/null)" != "$want" ] \
        || ! "$DEPLOY_PY" -c 'import yaml, yamllint, kubernetes_validate' >/dev/null 2>&1; then
        echo "==> installing $want into $DEPLOY_VENV"
        rm -rf "$DEPLOY_VENV"
        mkdir -p "$DEPLOY_CACHE"
        python3 -m venv "$DEPLOY_VENV"
        # shellcheck disable=SC2086 # two requirement words
        "$DEPLOY_PY" -m pip install --quiet --disable-pip-version-check $want
        echo "$want" >"$DEPLOY_VENV/.pgnear-requirements"
    fi
}
