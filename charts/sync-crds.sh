#!/usr/bin/env bash
# Keeps the chart's copy of the generated CRDs identical to the generator's
# output: crds/*.yaml -> charts/lossless-ingest/files/crds/ (verbatim; the
# chart's template adds its labels and `helm.sh/resource-policy: keep`).
#
#   charts/sync-crds.sh           copy crds/*.yaml into the chart
#   charts/sync-crds.sh --check   fail (and show the diff) when the copy differs (CI)
set -euo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
SRC=$ROOT/crds
DEST=$ROOT/charts/lossless-ingest/files/crds

case ${1:-} in
"") mode=sync ;;
--check) mode=check ;;
*)
	echo "usage: $0 [--check]" >&2
	exit 2
	;;
esac

shopt -s nullglob
generated=("$SRC"/*.yaml)
if ((${#generated[@]} == 0)); then
	echo "sync-crds: crds/ holds no generated CRD; run the operator's CRD generator first" >&2
	exit 1
fi

if [[ $mode == check ]]; then
	if (cd "$ROOT" && diff -ru "${SRC#"$ROOT"/}" "${DEST#"$ROOT"/}") >&2; then
		echo "sync-crds: the chart's CRDs match crds/"
		exit 0
	fi
	echo "sync-crds: charts/lossless-ingest/files/crds/ differs from crds/; run charts/sync-crds.sh" >&2
	exit 1
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.yaml
cp "${generated[@]}" "$DEST"/
echo "sync-crds: copied ${#generated[@]} CRD file(s) into ${DEST#"$ROOT"/}"
