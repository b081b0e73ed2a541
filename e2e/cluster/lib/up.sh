# shellcheck shell=bash
# `cluster up` and `cluster status`: a control plane on the host and N nodes,
# each with its own containerd, kubelet, cgroup root, pod bridge and node IP.

# Host paths that kubelet or containerd create with hard-coded names. The ones
# missing before `up` are recorded and removed again by `down`.
HOST_PATHS=(/var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/netns /etc/cni /run/containerd)

node_name() { printf 'node-%s' "$(printf '%b' "\\x$(printf '%x' $((97 + $1)))")"; }
node_ip() { printf '10.200.0.%d' $(($1 + 1)); }
node_pod_cidr() { printf '10.244.%d.0/24' "$1"; }
node_bridge() { printf '%s%d' "$POD_BRIDGE_PREFIX" "$1"; }
node_dir() { printf '%s/nodes/%s' "$STATE_DIR" "$1"; }

# v1 controllers (where `up` makes each node's cgroup root); kubelet also
# writes to the v2 hierarchy of a hybrid host, so `down` sweeps both.
cgroup_controllers() { awk '$3 == "cgroup" { print $2 }' /proc/mounts; }
cgroup_hierarchies() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/mounts; }

# pid_alive NAME: the process recorded for NAME still runs (and is still ours:
# its command line names the binary recorded beside the pid, guarding pid reuse).
pid_alive() {
	local f=$PID_DIR/$1.pid pid exe
	[[ -f $f ]] || return 1
	read -r pid exe <"$f"
	[[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$exe"
}

# start_daemon NAME BINARY ARGS...: detached (own session, no inherited pipes,
# so whoever ran `up` can exit or wait on our stdout), logged, pid recorded.
start_daemon() {
	local name=$1 exe=$2
	shift 2
	setsid "$exe" "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
	printf '%s %s\n' "$!" "$exe" >"$PID_DIR/$name.pid"
}

# wait_for DESC SECONDS LOG CMD...: poll CMD until it succeeds; on timeout name
# the log to read, show its tail, and fail.
wait_for() {
	local desc=$1 timeout=$2 logf=$3 deadline
	shift 3
	deadline=$((SECONDS + timeout))
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			log "timed out after ${timeout}s waiting for $desc"
			[[ -f $logf ]] && tail -n 20 "$logf" >&2
			die "$desc: see $logf"
		fi
		sleep 0.3
	done
}

kc() { "$(kube_bin kubectl)" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# --- guards: before anything can send a packet -----------------------------

# Nothing for the pod, node or Service ranges may take the default route, even
# while a component is down: the per-bridge routes are more specific and win.
install_guards() {
	ip route replace blackhole "$POD_CIDR"
	ip route replace blackhole "$NODE_CIDR"
	# kube-proxy DNATs Service VIPs in OUTPUT; with no rule the VIP is refused locally.
	ip route replace local "$SERVICE_CIDR" dev lo
	# Pods have a default route (needed to reach VIPs and the API server through
	# the bridge gateway): never forward their packets anywhere but to the cluster.
	nft -f - <<NFT
table inet $NFT_GUARD_TABLE
delete table inet $NFT_GUARD_TABLE
table inet $NFT_GUARD_TABLE {
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		ip saddr $POD_CIDR ip daddr != { $POD_CIDR, $NODE_CIDR } counter drop
		ip daddr $POD_CIDR ip saddr != { $POD_CIDR, $NODE_CIDR } counter drop
	}
}
NFT
}

setup_host_network() {
	sysctl -n net.ipv4.ip_forward >"$STATE_DIR/ip_forward.orig"
	sysctl -qw net.ipv4.ip_forward=1
	ip link add "$NODE_BRIDGE" type bridge 2>/dev/null || true
	ip link set "$NODE_BRIDGE" up
	ip addr replace "$APISERVER_IP/32" dev "$NODE_BRIDGE"
}

# --- PKI and credentials ----------------------------------------------------

gen_pki() {
	local pki=$STATE_DIR/pki n
	mkdir -p "$pki"
	(
		cd "$pki" || exit 1
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
			-subj "/CN=lossless-ingest-e2e-ca" -keyout ca.key -out ca.crt
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr
		# The first Service IP is the `kubernetes` Service VIP pods use.
		openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
			-out apiserver.crt -extfile <(printf '%s\n' \
				"basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
				"extendedKeyUsage=serverAuth" \
				"subjectAltName=IP:$APISERVER_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
		# RSA for service-account tokens: RS256 is what every client expects.
		openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
		openssl pkey -in sa.key -pubout -out sa.pub
		# Test-only static tokens (never in the chart): one identity per component,
		# so Node and RBAC authorization judge each of them as in a real cluster.
		: >tokens.csv
		add_token() { printf '%s,%s,%s,"%s"\n' "$(openssl rand -hex 16 | tee "$1.token")" "$2" "$2" "$3" >>tokens.csv; }
		add_token admin admin system:masters
		add_token controller-manager system:kube-controller-manager ""
		add_token scheduler system:kube-scheduler ""
		add_token kube-proxy system:kube-proxy ""
		for n in $(seq 0 $((NODES - 1))); do add_token "$(node_name "$n")" "system:node:$(node_name "$n")" system:nodes; done
		chmod 600 ./*.key ./*.token tokens.csv
	) >>"$LOG_DIR/pki.log" 2>&1
}

# write_kubeconfig FILE TOKENFILE
write_kubeconfig() {
	cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: lossless-ingest-e2e
  cluster:
    server: https://$APISERVER_IP:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$STATE_DIR/pki/ca.crt")
users:
- name: user
  user:
    token: $(cat "$2")
contexts:
- name: lossless-ingest-e2e
  context: {cluster: lossless-ingest-e2e, user: user}
current-context: lossless-ingest-e2e
KUBECONFIG
	chmod 600 "$1"
}

# --- control plane ------------------------------------------------------------

start_etcd() {
	start_daemon etcd "$(etcd_bin)" --name e2e --data-dir "$STATE_DIR/etcd" \
		--listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
		--advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
		--unsafe-no-fsync --log-level warn
}

start_apiserver() {
	local pki=$STATE_DIR/pki
	start_daemon kube-apiserver "$(kube_bin kube-apiserver)" \
		--etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
		--bind-address "$APISERVER_IP" --advertise-address "$APISERVER_IP" --secure-port "$APISERVER_PORT" \
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
		--client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
		--authorization-mode Node,RBAC --allow-privileged=true \
		--service-cluster-ip-range "$SERVICE_CIDR" \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
		--enable-aggregator-routing=true \
		--kubelet-preferred-address-types InternalIP \
		--profiling=false --v=1
}

start_controllers() {
	local pki=$STATE_DIR/pki
	# --kubeconfig only: --authentication-kubeconfig would wait for a configmap
	# that a token-only API server never writes.
	start_daemon kube-controller-manager "$(kube_bin kube-controller-manager)" \
		--kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
		--use-service-account-credentials=true \
		--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
		--cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false \
		--bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1
	start_daemon kube-scheduler "$(kube_bin kube-scheduler)" \
		--kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
		--bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1
}

start_kube_proxy() {
	cat >"$STATE_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: $STATE_DIR/kube-proxy.kubeconfig
# One kube-proxy in the host namespace serves every node.
hostnameOverride: $(node_name 0)
clusterCIDR: $POD_CIDR
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_CIDR"]
# Leave the host's conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML
	start_daemon kube-proxy "$(kube_bin kube-proxy)" --config "$STATE_DIR/kube-proxy.yaml" --v=1
}

# --- nodes ----------------------------------------------------------------------

setup_node_cgroups() {
	local node=$1 c d
	for c in $(cgroup_controllers); do
		for d in "$c/lossless-ingest" "$c/lossless-ingest/$node"; do
			mkdir -p "$d"
			# A new cpuset cgroup starts with no CPUs or memory nodes: inherit them.
			if [[ -f $d/cpuset.cpus ]]; then
				cat "$c/cpuset.cpus" >"$d/cpuset.cpus"
				cat "$c/cpuset.mems" >"$d/cpuset.mems"
			fi
		done
	done
}

write_containerd_config() {
	local i=$1 dir
	dir=$(node_dir "$(node_name "$i")")
	mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/cni/ipam"
	cat >"$dir/containerd/config.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$dir/containerd/containerd.sock"
[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # These machines drop CAP_SYS_RESOURCE: lowering oom_score_adj would make runc fail.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
TOML
	# The default route is what lets pods reach Service VIPs and the API server;
	# the nft forward guard keeps it from reaching anything off the cluster.
	cat >"$dir/cni/net.d/10-bridge.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "lossless-ingest-$(node_name "$i")",
  "plugins": [{
    "type": "bridge",
    "bridge": "$(node_bridge "$i")",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{ "subnet": "$(node_pod_cidr "$i")" }]],
      "routes": [{ "dst": "0.0.0.0/0" }],
      "dataDir": "$dir/cni/ipam"
    }
  }]
}
JSON
}

write_kubelet_config() {
	local i=$1 node dir
	node=$(node_name "$i")
	dir=$(node_dir "$node")
	mkdir -p "$dir/kubelet" "$dir/pod-logs"
	cat >"$dir/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Every kubelet shares the host network namespace: each binds its own node IP.
address: $(node_ip "$i")
port: 10250
readOnlyPort: 0
healthzBindAddress: $(node_ip "$i")
healthzPort: 10248
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /lossless-ingest/$node
# cgroups are v1 (hybrid) on these machines.
failCgroupV1: false
failSwapOn: false
resolvConf: ""
podLogsDir: $dir/pod-logs
# Test-only: the API server reaches kubelets anonymously (logs, exec).
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
# Disk and memory are shared by every node and the host: never evict or GC.
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# Room for the operator benchmark's 300 ingest pods on two nodes.
maxPods: 250
YAML
	write_kubeconfig "$dir/kubelet.kubeconfig" "$STATE_DIR/pki/$node.token"
}

start_node_containerd() {
	local i=$1 node
	node=$(node_name "$i")
	setup_node_cgroups "$node"
	write_containerd_config "$i"
	start_daemon "containerd-$node" "$(command -v containerd)" --config "$(node_dir "$node")/containerd/config.toml"
}

start_node_kubelet() {
	local i=$1 node
	node=$(node_name "$i")
	write_kubelet_config "$i"
	ip addr replace "$(node_ip "$i")/32" dev "$NODE_BRIDGE"
	start_daemon "kubelet-$node" "$(kube_bin kubelet)" \
		--config "$(node_dir "$node")/kubelet.yaml" \
		--kubeconfig "$(node_dir "$node")/kubelet.kubeconfig" \
		--root-dir "$(node_dir "$node")/kubelet" \
		--hostname-override "$node" --node-ip "$(node_ip "$i")" --v=1
}

containerd_ready() { ctr_node "$1" version; }
apiserver_ready() { kc get --raw /readyz; }
nodes_registered() { [[ $(kc get nodes -o name | wc -l) -ge $NODES ]]; }
default_sa_exists() { kc -n "$1" get serviceaccount default; }

# One pause pod per node, placed by the scheduler (not nodeName), so `up`
# proves scheduling, sandbox creation, CNI and the kubelet status loop.
run_probe_pods() {
	local i node
	kc create namespace lli-probe >/dev/null
	wait_for "service account in namespace lli-probe" 60 "$LOG_DIR/kube-controller-manager.log" default_sa_exists lli-probe
	for i in $(seq 0 $((NODES - 1))); do
		node=$(node_name "$i")
		kc apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: probe-$node, namespace: lli-probe}
spec:
  nodeSelector: {kubernetes.io/hostname: $node}
  terminationGracePeriodSeconds: 0
  containers:
  - name: pause
    image: $PAUSE_IMAGE
    imagePullPolicy: Never
YAML
	done
	if ! kc -n lli-probe wait --for=condition=Ready pod --all --timeout=120s >/dev/null; then
		kc -n lli-probe get pods -o wide >&2 || true
		kc -n lli-probe get events >&2 || true
		die "probe pods did not become Ready: see $LOG_DIR (kubelet-*.log, containerd-*.log)"
	fi
	kc -n lli-probe get pods -o wide >>"$LOG_DIR/up.log"
	# Leave no trace for the tests; the deletion finishes in the background.
	kc delete namespace lli-probe --wait=false >/dev/null
}

record_host_paths() {
	local p
	: >"$STATE_DIR/host-paths"
	for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] || printf '%s\n' "$p" >>"$STATE_DIR/host-paths"; done
	# nft tables of others (iptables-nft included) that `down` must leave alone.
	nft list tables >"$STATE_DIR/nft-tables.before" 2>/dev/null || true
	# Network namespaces of others (if any) that `down` must leave alone.
	find /run/netns -maxdepth 1 -name 'cni-*' -printf '%f\n' 2>/dev/null >"$STATE_DIR/netns.before" || true
}

cluster_running() { pid_alive kube-apiserver && apiserver_ready >/dev/null 2>&1; }

cmd_up() {
	NODES=2
	while (($#)); do
		case $1 in
		--nodes) NODES=$2; shift 2 ;;
		--nodes=*) NODES=${1#--nodes=}; shift ;;
		*) die "up: unknown argument $1" ;;
		esac
	done
	[[ $NODES =~ ^[1-9][0-9]*$ && $NODES -le 26 ]] || die "--nodes must be 1..26"
	need_root
	local start i node
	start=$(now)

	if [[ -d $STATE_DIR ]]; then
		if cluster_running && [[ $(cat "$STATE_DIR/nodes.count" 2>/dev/null) == "$NODES" ]]; then
			log "cluster already up ($NODES nodes)"
			printf 'export KUBECONFIG=%s\n' "$KUBECONFIG_PATH"
			return 0
		fi
		log "removing a previous cluster's leftovers"
		cmd_down
	fi
	cmd_build
	step "pause image" ensure_pause_image

	mkdir -p "$LOG_DIR" "$PID_DIR" "$STATE_DIR/nodes"
	echo "$NODES" >"$STATE_DIR/nodes.count"
	record_host_paths
	log "state and logs: $STATE_DIR (logs: $LOG_DIR)"
	step "guard routes and nft forward guard" install_guards
	step "host network (bridge $NODE_BRIDGE, $APISERVER_IP)" setup_host_network
	step "certificates and tokens" gen_pki
	write_kubeconfig "$KUBECONFIG_PATH" "$STATE_DIR/pki/admin.token"
	write_kubeconfig "$STATE_DIR/controller-manager.kubeconfig" "$STATE_DIR/pki/controller-manager.token"
	write_kubeconfig "$STATE_DIR/scheduler.kubeconfig" "$STATE_DIR/pki/scheduler.token"
	write_kubeconfig "$STATE_DIR/kube-proxy.kubeconfig" "$STATE_DIR/pki/kube-proxy.token"

	# Node containerds start while the API server comes up: neither needs the other.
	for i in $(seq 0 $((NODES - 1))); do start_node_containerd "$i"; done
	start_etcd
	start_apiserver
	for i in $(seq 0 $((NODES - 1))); do
		node=$(node_name "$i")
		wait_for "containerd of $node" 30 "$LOG_DIR/containerd-$node.log" containerd_ready "$node"
		import_into_node "$node" "$(pause_image_tar)"
	done
	step "kube-apiserver ready" wait_for "kube-apiserver /readyz" 90 "$LOG_DIR/kube-apiserver.log" apiserver_ready
	start_controllers
	start_kube_proxy
	for i in $(seq 0 $((NODES - 1))); do start_node_kubelet "$i"; done
	step "$NODES nodes registered" wait_for "$NODES nodes to register" 90 "$LOG_DIR/kubelet-$(node_name 0).log" nodes_registered
	for i in $(seq 0 $((NODES - 1))); do
		kc patch node "$(node_name "$i")" --type merge \
			-p "{\"spec\":{\"podCIDR\":\"$(node_pod_cidr "$i")\",\"podCIDRs\":[\"$(node_pod_cidr "$i")\"]}}" >/dev/null
	done
	# stdout carries only the export line: kubectl's chatter goes to stderr.
	step "nodes Ready" kc wait --for=condition=Ready node --all --timeout=120s >&2
	step "probe pod on each node" run_probe_pods
	log "cluster up: $NODES nodes in $(elapsed "$start")"
	printf 'export KUBECONFIG=%s\n' "$KUBECONFIG_PATH"
}

cmd_status() {
	local f name
	if [[ ! -d $STATE_DIR ]]; then
		echo "no cluster (no $STATE_DIR)"
		return 0
	fi
	echo "state: $STATE_DIR   logs: $LOG_DIR"
	local blackholes locals
	# Captured first: `ip ... | grep -q` fails under pipefail when grep exits early.
	blackholes=$(ip route show type blackhole)
	locals=$(ip route show table local type local)
	if [[ $blackholes == *"$POD_CIDR"* && $blackholes == *"$NODE_CIDR"* && $locals == *"$SERVICE_CIDR"* ]] &&
		nft list table inet "$NFT_GUARD_TABLE" >/dev/null 2>&1; then
		echo "guards: routes for $POD_CIDR $NODE_CIDR $SERVICE_CIDR and nft forward guard in place"
	else
		echo "guards: INCOMPLETE (run 'cluster down', then 'cluster up')"
	fi
	for f in "$PID_DIR"/*.pid; do
		[[ -f $f ]] || continue
		name=$(basename "$f" .pid)
		if pid_alive "$name"; then
			printf '  %-32s running (pid %s)\n' "$name" "$(cut -d' ' -f1 "$f")"
		else
			printf '  %-32s NOT running\n' "$name"
		fi
	done
	if cluster_running; then
		kc get nodes -o wide
		printf 'export KUBECONFIG=%s\n' "$KUBECONFIG_PATH"
	else
		echo "API server not reachable"
		return 1
	fi
}
