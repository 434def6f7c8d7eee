#!/usr/bin/env bash
# Sets the release version everywhere it is written down:
#   scripts/bump-version.sh X.Y.Z
# caio/version.py is the source of truth (setup.py reads it); Cargo needs a
# literal of its own, so Cargo.toml's [workspace.package] version is set to
# the same value and Cargo.lock's workspace crates follow.
# tests/test_version.py checks that they agree (CONTRIBUTING.md, "Release").
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${1:-}
if [[ ! "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "usage: scripts/bump-version.sh X.Y.Z" >&2
    exit 2
fi

sed -i -E "s/^__version__ = \"[^\"]*\"$/__version__ = \"$VERSION\"/" caio/version.py
grep -qx "__version__ = \"$VERSION\"" caio/version.py || {
    echo "bump-version: could not set the version in caio/version.py" >&2
    exit 1
}

# Only the version line of the [workspace.package] section.
sed -i -E "/^\[workspace\.package\]/,/^\[/ s/^version = \"[^\"]*\"$/version = \"$VERSION\"/" Cargo.toml
sed -n '/^\[workspace\.package\]/,/^\[/p' Cargo.toml | grep -qx "version = \"$VERSION\"" || {
    echo "bump-version: could not set [workspace.package] version in Cargo.toml" >&2
    exit 1
}

# Rewrites the workspace crates' entries in Cargo.lock (dependencies stay).
cargo update --workspace --offline

echo "version $VERSION: caio/version.py, Cargo.toml, Cargo.lock"
echo "next: make develop && make test && scripts/lint.sh; CHANGELOG.md [Unreleased] -> [$VERSION]"
