#!/usr/bin/env bash
# Builds the offline release tarball: dist/pdagent-<version>-<arch>.tar.gz with stripped
# binaries, the unit, the example configuration, the install script, the README and pdagent's
# KV connector for vLLM (python/pdagent_vllm; the agent also writes its embedded copy to its
# data dir, which is what vLLM loads).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
cargo build --release --bins -j"${JOBS:-2}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name="pdagent-$version-$(uname -m)"
stage=$(mktemp -d)
mkdir -p "$stage/$name/bin"
for b in pdagent pdctl; do
  cp "target/release/$b" "$stage/$name/bin/$b"
  strip "$stage/$name/bin/$b"
done
cp systemd/pdagent.service systemd/pdagent.toml systemd/install.sh README.md "$stage/$name/"
mkdir -p "$stage/$name/python"
cp -r python/pdagent_vllm "$stage/$name/python/"
find "$stage/$name/python" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p dist
tar -C "$stage" -czf "dist/$name.tar.gz" "$name"
rm -rf "$stage"
echo "dist/$name.tar.gz"
