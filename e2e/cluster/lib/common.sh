# shellcheck shell=bash
# Shared settings and helpers for every `cluster` subcommand. Sourced, never run.

# shellcheck source=../../versions.env
source "$E2E_DIR/versions.env"

# Staging modules (k8s.io/api, client-go, ...) are versioned v0.<minor>.<patch>.
KUBE_STAGING_VERSION="v0.${KUBERNETES_VERSION#v1.}"

# Binaries are cached per version outside the repo, so a warm run is a no-op
# and a version bump never mixes old and new binaries.
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/lossless-ingest"
K8S_CACHE="$CACHE_ROOT/k8s-$KUBERNETES_VERSION"
ETCD_CACHE="$CACHE_ROOT/etcd-$ETCD_VERSION"
HELM_CACHE="$CACHE_ROOT/helm-$HELM_VERSION"
PROMETHEUS_CACHE="$CACHE_ROOT/prometheus-$PROMETHEUS_VERSION"
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

# Everything a running cluster owns lives here (state, certs, logs, pids).
STATE_DIR="${LOSSLESS_CLUSTER_DIR:-/tmp/lossless-ingest-cluster}"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"

# Address plan. Every range exists only on bridges this script creates, and
# guard routes keep packets for them from ever taking the default route.
POD_CIDR=10.244.0.0/16        # node i gets 10.244.i.0/24
NODE_CIDR=10.200.0.0/24       # node i gets 10.200.0.(i+1)/32 on the node bridge
SERVICE_CIDR=10.96.0.0/16
APISERVER_IP=10.200.0.254     # kube-apiserver binds and advertises here
APISERVER_PORT=6443
NODE_BRIDGE=lli-nodes         # holds the node IPs and the API server address
POD_BRIDGE_PREFIX=lli-pod     # lli-pod0, lli-pod1, ... (one per node)
NFT_GUARD_TABLE=lossless_ingest_guard
ETCD_CLIENT_PORT=23790        # loopback only; off the default 2379 so a host etcd never collides
ETCD_PEER_PORT=23800
KUBECONFIG_PATH="$STATE_DIR/kubeconfig"

now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
log() { printf '[cluster %(%T)T] %s\n' -1 "$*" >&2; }
die() {
	log "error: $*"
	[[ -d $LOG_DIR ]] && log "component logs: $LOG_DIR"
	exit 1
}

# step NAME CMD...: run CMD, print how long it took; fail loudly with NAME.
step() {
	local name=$1 start
	shift
	start=$(now)
	log "$name ..."
	"$@" || die "$name failed"
	log "$name done in $(elapsed "$start")"
}

need_root() {
	[[ $EUID -eq 0 ]] || die "must run as root (bridges, routes, cgroups, containerd)"
}

# apt_ensure PKG...: install the Debian packages that are not installed yet.
apt_ensure() {
	local p missing=()
	for p in "$@"; do
		dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	need_root
	log "apt-get install ${missing[*]}"
	# Lists may be absent or stale on a fresh machine; an update is cheap next to an install.
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

kube_bin() { printf '%s/bin/%s' "$K8S_CACHE" "$1"; }
etcd_bin() { printf '%s/bin/etcd' "$ETCD_CACHE"; }
helm_bin() { printf '%s/bin/helm' "$HELM_CACHE"; }
promtool_bin() { printf '%s/bin/promtool' "$PROMETHEUS_CACHE"; }
pause_bin() { printf '%s/bin/pause' "$K8S_CACHE"; }
