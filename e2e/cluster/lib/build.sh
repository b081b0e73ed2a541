# shellcheck shell=bash
# `cluster build`: every binary the cluster runs, from the Go module proxy
# into a version-keyed cache, plus the Debian packages. A warm run only checks.

# go_wrapper_init DIR MODULE@VERSION IMPORT... : a throwaway module in DIR that
# requires MODULE@VERSION and blank-imports the main packages to build, so
# `go mod tidy` resolves exactly their dependency graph. Built into DIR.tmp and
# renamed, so an interrupted run never leaves a half-made wrapper behind.
go_wrapper_init() {
	local dir=$1 modver=$2 pkg
	shift 2
	[[ -f $dir/go.sum ]] && return 0
	rm -rf "$dir.tmp"
	mkdir -p "$dir.tmp"
	(
		cd "$dir.tmp"
		go mod init lossless-ingest.local/build >/dev/null 2>&1
		{
			echo '//go:build tools'
			echo
			echo '// Package tools pins the main packages this wrapper module builds.'
			echo 'package tools'
			echo
			echo 'import ('
			for pkg in "$@"; do printf '\t_ "%s"\n' "$pkg"; done
			echo ')'
		} >tools.go
		go mod edit -require="$modver"
		# Hook for a caller that must add replaces before tidy (Kubernetes staging).
		if declare -F wrapper_pre_tidy >/dev/null; then wrapper_pre_tidy; fi
		go mod tidy
	) || return 1
	mv "$dir.tmp" "$dir"
}

# go_build_into WRAPPER OUT PKG LDFLAGS: build PKG once; an existing OUT is kept.
go_build_into() {
	local wrapper=$1 out=$2 pkg=$3 ldflags=$4
	[[ -x $out ]] && return 0
	mkdir -p "$(dirname "$out")"
	# nice: other engineers' cargo builds share these 2 cores.
	CGO_ENABLED=0 nice -n 10 go -C "$wrapper" build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg" &&
		mv "$out.tmp" "$out"
}

# Kubernetes' go.mod replaces each staging module with ./staging/src/...; the
# wrapper must replace exactly those with their published v0.x.y versions.
# Other k8s.io modules (utils, kube-openapi) are real pseudo-versions: leave them.
kube_wrapper_pre_tidy() {
	local kdir mod
	kdir=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | jq -r .Dir)
	[[ -f $kdir/go.mod ]] || return 1
	while read -r mod; do
		go mod edit -replace="$mod=$mod@$KUBE_STAGING_VERSION"
	done < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// { print $1 }' "$kdir/go.mod")
}

kube_module_dir() {
	go -C "$K8S_CACHE/src" list -m -json k8s.io/kubernetes | jq -r .Dir
}

build_kubernetes() {
	local b pkgs=() ldflags minor
	minor=${KUBERNETES_VERSION#v1.}
	minor=${minor%%.*}
	for b in "${KUBE_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
	# shellcheck disable=SC2317 # called by go_wrapper_init
	wrapper_pre_tidy() { kube_wrapper_pre_tidy; }
	step "kubernetes $KUBERNETES_VERSION: wrapper module + go mod tidy" \
		go_wrapper_init "$K8S_CACHE/src" "k8s.io/kubernetes@$KUBERNETES_VERSION" "${pkgs[@]}"
	unset -f wrapper_pre_tidy
	# Clients and the API server report this version (kubectl version, node info).
	ldflags="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
	ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
	ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
	ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
	# kube-apiserver first: it is the longest, and the others reuse its build cache.
	for b in "${KUBE_BINARIES[@]}"; do
		if [[ -x $(kube_bin "$b") ]]; then continue; fi
		step "build $b" go_build_into "$K8S_CACHE/src" "$(kube_bin "$b")" "k8s.io/kubernetes/cmd/$b" "$ldflags"
	done
}

build_pause() {
	local out kdir
	out=$(pause_bin)
	[[ -x $out ]] && return 0
	kdir=$(kube_module_dir)
	# Static, so the pause image is one file with no loader or libc.
	step "build pause (gcc -static)" \
		gcc -Os -static -Wall -DVERSION="$KUBERNETES_VERSION" -o "$out" "$kdir/build/pause/linux/pause.c"
}

build_etcd() {
	[[ -x $(etcd_bin) ]] && return 0
	step "etcd $ETCD_VERSION: wrapper module + go mod tidy" \
		go_wrapper_init "$ETCD_CACHE/src" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
	step "build etcd" go_build_into "$ETCD_CACHE/src" "$(etcd_bin)" go.etcd.io/etcd/server/v3 ""
}

build_helm() {
	local major=${HELM_VERSION%%.*}
	[[ -x $(helm_bin) ]] && return 0
	step "helm $HELM_VERSION: wrapper module + go mod tidy" \
		go_wrapper_init "$HELM_CACHE/src" "helm.sh/helm/$major@$HELM_VERSION" "helm.sh/helm/$major/cmd/helm"
	step "build helm" go_build_into "$HELM_CACHE/src" "$(helm_bin)" "helm.sh/helm/$major/cmd/helm" \
		"-X helm.sh/helm/$major/internal/version.version=$HELM_VERSION -X helm.sh/helm/$major/internal/version.gitTreeState=clean"
}

build_promtool() {
	local release=${PROMETHEUS_VERSION#v0.}
	[[ -x $(promtool_bin) ]] && return 0
	# v0.316.0 -> 3.16.0: what `promtool --version` reports.
	release="${release:0:1}.$((10#${release:1:2})).${release#*.}"
	step "prometheus $PROMETHEUS_VERSION: wrapper module + go mod tidy" \
		go_wrapper_init "$PROMETHEUS_CACHE/src" "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" \
		github.com/prometheus/prometheus/cmd/promtool
	step "build promtool" go_build_into "$PROMETHEUS_CACHE/src" "$(promtool_bin)" \
		github.com/prometheus/prometheus/cmd/promtool "-X github.com/prometheus/common/version.Version=$release"
}

# True when every cached artefact exists: the warm path does no go invocation.
build_is_warm() {
	local b
	for b in "${KUBE_BINARIES[@]}"; do [[ -x $(kube_bin "$b") ]] || return 1; done
	[[ -x $(pause_bin) && -x $(etcd_bin) && -x $(helm_bin) && -x $(promtool_bin) ]]
}

cmd_build() {
	local start
	start=$(now)
	# shellcheck disable=SC2086 # the package lists are word lists
	step "debian packages" apt_ensure $CLUSTER_DEBIAN_PACKAGES
	if build_is_warm; then
		log "binaries cached in $CACHE_ROOT (kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, prometheus $PROMETHEUS_VERSION)"
	else
		command -v go >/dev/null || die "go is required to build the cluster binaries"
		build_kubernetes
		build_pause
		build_etcd
		build_helm
		build_promtool
	fi
	log "build complete in $(elapsed "$start")"
}

cmd_paths() {
	local b
	for b in "${KUBE_BINARIES[@]}"; do printf '%s=%s\n' "$b" "$(kube_bin "$b")"; done
	printf 'etcd=%s\nhelm=%s\npause=%s\npromtool=%s\n' "$(etcd_bin)" "$(helm_bin)" "$(pause_bin)" "$(promtool_bin)"
}

# shellcheck disable=SC2086 # the package lists are word lists
cmd_deps() {
	local group
	for group in "${@:-cluster}"; do
		case $group in
		cluster) apt_ensure $CLUSTER_DEBIAN_PACKAGES ;;
		smoke) apt_ensure $SMOKE_DEBIAN_PACKAGES ;;
		*) die "deps: unknown group $group (cluster, smoke)" ;;
		esac
	done
}
