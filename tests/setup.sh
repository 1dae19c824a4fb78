#!/usr/bin/env bash
# Installs what the tests need, under target/ (nothing system-wide), and reuses what is there
# when its pins have not changed:
#   target/pyenv       the official OpenAI SDK and prometheus_client (tests/python/requirements.txt)
#   target/vllm-venv   vLLM's CPU build with NIXL (tests/python/vllm-requirements.txt), about
#                      6.4 GB; PDAGENT_SKIP_VLLM=1 leaves it out (the vLLM tests then say SKIPPED)
# The tests find both there; PDAGENT_TEST_PYTHON and PDAGENT_TEST_VLLM_PYTHON override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p target

pins() { cat "$@" | sha256sum | cut -d' ' -f1; }

want=$(pins tests/python/requirements.txt)
if [ "$(cat target/pyenv/.pins 2>/dev/null || true)" != "$want" ]; then
  echo "== installing the Python clients into target/pyenv"
  rm -rf target/pyenv
  "$PY" -m venv target/pyenv
  target/pyenv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  echo "$want" > target/pyenv/.pins
else
  echo "== target/pyenv is current"
fi

if [ "${PDAGENT_SKIP_VLLM:-}" = 1 ]; then
  echo "== PDAGENT_SKIP_VLLM=1: vLLM not installed (its tests will say SKIPPED)"
  exit 0
fi
want=$(pins tests/python/vllm-requirements.txt "$0")
if [ "$(cat target/vllm-venv/.pins 2>/dev/null || true)" != "$want" ]; then
  echo "== installing vLLM's CPU build into target/vllm-venv (about 6.4 GB)"
  rm -rf target/vllm-venv
  "$PY" -m venv target/vllm-venv
  target/vllm-venv/bin/pip install --quiet --disable-pip-version-check uv
  tmp=$(mktemp -d)
  echo 'torch==2.13.0' > "$tmp/overrides.txt"
  echo 'torchvision<0.29' > "$tmp/constraints.txt"
  # uv trusts the system's CA store as pip does.
  export UV_SYSTEM_CERTS=1
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  fi
  target/vllm-venv/bin/uv pip install --quiet --python target/vllm-venv/bin/python \
    --overrides "$tmp/overrides.txt" --constraints "$tmp/constraints.txt" \
    -r tests/python/vllm-requirements.txt
  rm -rf "$tmp"
  target/vllm-venv/bin/python -c 'import vllm, openai, prometheus_client; print("vllm", vllm.__version__)'
  echo "$want" > target/vllm-venv/.pins
else
  echo "== target/vllm-venv is current"
fi
