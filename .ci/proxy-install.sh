#!/usr/bin/env bash
# `pip install tidyllm[proxy]` with the pinned versions, on a fresh virtual environment: it resolves
# (pip check), LiteLLM's proxy app imports, and `tidyllm proxy --print-config` writes a config.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/tidyllm-proxy-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e '.[proxy]'
"$venv/bin/python" -m pip check
export LITELLM_LOCAL_MODEL_COST_MAP=True
(cd "$venv" && "$venv/bin/python" -c "import litellm.proxy.proxy_server, tidyllm.proxy.hooks; print('LiteLLM proxy app imports')")
home=$(mktemp -d)
TIDYLLM_HOME="$home" TIDYLLM_GATEWAY_URI=http://127.0.0.1:5000 \
  TIDYLLM_GATEWAY_CONFIG=tidyllm/examples_data/gateway.yaml \
  "$venv/bin/tidyllm" proxy --print-config | grep -q "custom_auth: tidyllm.proxy.runtime.user_api_key_auth"
rm -rf "$home"
echo "tidyllm[proxy] installs on a fresh virtual environment"
