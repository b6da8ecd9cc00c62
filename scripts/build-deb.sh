#!/usr/bin/env bash
# Builds greydaemon's Debian package into dist/: the binary (static,
# stripped, position-independent), the systemd units with the packaged
# paths and user, the man page, and nfpm (run through `go run`, pinned) to
# put them together as packaging/nfpm.yaml says. VERSION overrides the
# version (default: 0.1.0~git<commit date>.<commit>).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
: "${VERSION:=0.1.0~git$(git log -1 --format=%cd --date=format:%Y%m%d).$(git rev-parse --short=7 HEAD)}"
GOARCH=$(go env GOARCH)
export VERSION GOARCH
stage=build/deb
rm -rf "$stage" && mkdir -p "$stage" dist
CGO_ENABLED=0 go build -trimpath -buildmode=pie -ldflags='-s -w' -o "$stage/greydaemon" .
# The units as the package installs them: the binary in /usr/sbin, and the
# packaged system user instead of a dynamic one (so that an admin can give
# it groups, as postfix's for the policy socket).
sed -e 's|/usr/local/bin/greydaemon|/usr/sbin/greydaemon|g' \
    -e 's|^DynamicUser=yes$|User=greydaemon\nGroup=greydaemon|' \
    -e 's|^# Install: copy the binary.*$|# Installed by the greydaemon package.|' \
    contrib/systemd/greydaemon.service >"$stage/greydaemon.service"
sed -e 's|/usr/local/bin/greydaemon|/usr/sbin/greydaemon|g' contrib/systemd/greydaemon.socket >"$stage/greydaemon.socket"
gzip -9n <greydaemon.8 >"$stage/greydaemon.8.gz"
date=$(git log -1 --format=%cD)
printf 'greydaemon (%s) unstable; urgency=medium\n\n  * Built from the greydaemon repository, commit %s.\n\n -- greydaemon developers <greydaemon@example.org>  %s\n' \
  "$VERSION" "$(git rev-parse --short=12 HEAD)" "$date" | gzip -9n >"$stage/changelog.gz"
go run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0 package --config packaging/nfpm.yaml --packager deb --target dist/ >&2
ls dist/greydaemon_"${VERSION}"_"${GOARCH}".deb
