#!/usr/bin/env bash
# The demo model's corpus: the King James Bible (public domain) from Debian's bible-kjv packages, one verse
# per line, verse numbers and chapter headings dropped. Needs apt-get (a Debian or Ubuntu package source).
# Usage: bash scripts/get_kjv.sh OUT.txt
set -euo pipefail
out=${1:?usage: get_kjv.sh OUT.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download bible-kjv bible-kjv-text >/dev/null 2>&1)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
# The package's own reader decompresses its data file; a wide line keeps each verse on one line.
"$work/root/usr/bin/bible" -l 100000 -p "$work/root/usr/lib" 'Gen1:1-Rev22:21' |
  sed -n 's/^ *[0-9][0-9]* //p' >"$out"
echo "$(wc -l <"$out") verses, $(wc -c <"$out") bytes in $out"
