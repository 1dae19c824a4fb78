#!/usr/bin/env bash
# Offline install of pdagent: binaries, systemd unit, example configuration. Needs no network.
#
#   sudo ./install.sh                 # from an unpacked release tarball
#   ./install.sh --destdir /tmp/root  # stage into a directory (packaging, tests)
#
# Layout expected beside this script: bin/pdagent, bin/pdctl, pdagent.service, pdagent.toml
# (the release tarball, made by systemd/make-tarball.sh). From a source checkout, pass
# --bin-dir target/release.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
destdir=""
prefix=/usr/local
bin_dir="$here/bin"
enable=0

usage() { sed -n '2,10p' "$0"; echo "options: --destdir DIR --prefix DIR --bin-dir DIR --enable"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) destdir=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --enable) enable=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
  esac
done

for f in "$bin_dir/pdagent" "$bin_dir/pdctl" "$here/pdagent.service" "$here/pdagent.toml"; do
  [ -f "$f" ] || { echo "install.sh: missing $f" >&2; exit 66; }
done

root=${destdir%/}
install -d -m 0755 "$root$prefix/bin" "$root/etc/systemd/system" "$root$prefix/share/doc/pdagent"
install -d -m 0750 "$root/etc/pdagent"
install -m 0755 "$bin_dir/pdagent" "$bin_dir/pdctl" "$root$prefix/bin/"
sed "s#/usr/local/bin/#$prefix/bin/#g" "$here/pdagent.service" > "$root/etc/systemd/system/pdagent.service"
chmod 0644 "$root/etc/systemd/system/pdagent.service"
install -m 0644 "$here/pdagent.toml" "$root$prefix/share/doc/pdagent/pdagent.toml.example"
[ -f "$here/README.md" ] && install -m 0644 "$here/README.md" "$root$prefix/share/doc/pdagent/README.md"
# Never overwrite an operator's configuration.
if [ ! -e "$root/etc/pdagent/pdagent.toml" ]; then
  # The example names node-1; a fresh install takes the host name instead.
  sed 's/^name = "node-1"/name = ""/' "$here/pdagent.toml" > "$root/etc/pdagent/pdagent.toml"
  chmod 0640 "$root/etc/pdagent/pdagent.toml"
  echo "installed /etc/pdagent/pdagent.toml (edit it, then: pdagent check-config)"
else
  echo "kept existing /etc/pdagent/pdagent.toml"
fi

if [ -z "$destdir" ]; then
  if ! getent passwd pdagent >/dev/null; then
    useradd --system --home-dir /var/lib/pdagent --no-create-home --shell /usr/sbin/nologin pdagent
  fi
  # Let the agent read its configuration; GPU access comes through the unit's DeviceAllow and
  # the video group where the driver uses it.
  chgrp pdagent /etc/pdagent /etc/pdagent/pdagent.toml
  getent group video >/dev/null && usermod -a -G video pdagent || true
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    [ "$enable" = 1 ] && systemctl enable --now pdagent.service
  fi
fi
echo "pdagent installed under $root$prefix (unit: $root/etc/systemd/system/pdagent.service)"
echo "next: put this host's certificates in /var/lib/pdagent/pki/ (pdctl cluster cert), then systemctl enable --now pdagent"
