# shellcheck shell=bash
# `cluster down`: remove everything `up` made, in an order that keeps a live
# component from recreating what was just removed. Every step tolerates
# "already gone", so it is safe to run twice or after a crash.

# stop_pid NAME: TERM, wait up to 10 s, then KILL the recorded process.
stop_pid() {
	local name=$1 pid _i
	pid_alive "$name" || { rm -f "$PID_DIR/$name.pid"; return 0; }
	read -r pid _ <"$PID_DIR/$name.pid"
	kill -TERM "$pid" 2>/dev/null || true
	for _i in $(seq 1 50); do
		[[ -d /proc/$pid ]] || break
		sleep 0.2
	done
	if [[ -d /proc/$pid ]]; then
		log "$name did not exit within 10s of SIGTERM: SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$PID_DIR/$name.pid"
}

# stop_matching GLOB...: stop every recorded process whose name matches, all
# signalled at once so their shutdowns overlap.
stop_matching() {
	local glob f
	local -a names=()
	[[ -d $PID_DIR ]] || return 0
	for glob in "$@"; do
		for f in "$PID_DIR"/$glob.pid; do
			[[ -f $f ]] && names+=("$(basename "$f" .pid)")
		done
	done
	for f in "${names[@]}"; do stop_pid "$f" & done
	wait
}

# kill_tree PID: children first (pgrep -P lists direct children), then PID.
kill_tree() {
	local child
	for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
	kill -KILL "$1" 2>/dev/null || true
}

# The runc shims outlive containerd. Each names its containerd's socket in its
# command line (-address SOCK): that identifies the ones of this cluster.
kill_shims() {
	local pid
	for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $STATE_DIR/" 2>/dev/null); do
		kill_tree "$pid"
	done
	for pid in $(seq 1 50); do
		pgrep -f -- "containerd-shim-runc-v2 .*-address $STATE_DIR/" >/dev/null 2>&1 || return 0
		sleep 0.1
	done
}

# Pod network namespaces CNI left in /run/netns: ours hold an address in the
# pod range, or appeared after `up` (a pod whose network setup failed half way).
delete_netns() {
	local ns prefix=${POD_CIDR%%.0.0/16}.
	for ns in /run/netns/cni-*; do
		[[ -e $ns ]] || continue
		ns=$(basename "$ns")
		if ip -n "$ns" -4 -o addr show 2>/dev/null | grep -qF " $prefix" ||
			{ [[ -f $STATE_DIR/netns.before ]] && ! grep -qxF "$ns" "$STATE_DIR/netns.before"; }; then
			ip netns delete "$ns" 2>/dev/null || true
		fi
	done
}

# Every mount below the state dir (overlay rootfs, shm, kubelet volumes), deepest first.
unmount_state() {
	local m
	[[ -d $STATE_DIR ]] || return 0
	for _ in 1 2 3; do
		mapfile -t mounts < <(awk -v d="$STATE_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
		((${#mounts[@]})) || return 0
		for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
	done
}

remove_cgroups() {
	local c
	for c in $(cgroup_hierarchies); do
		[[ -d $c/lossless-ingest ]] || continue
		# rmdir only: a cgroup directory cannot be removed with files in it, and
		# must be removed children first.
		find "$c/lossless-ingest" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
}

remove_network() {
	local br
	for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
		[[ $br == "$NODE_BRIDGE" || $br == "$POD_BRIDGE_PREFIX"* ]] && ip link delete "$br" 2>/dev/null
	done
	ip route del blackhole "$POD_CIDR" 2>/dev/null || true
	ip route del blackhole "$NODE_CIDR" 2>/dev/null || true
	ip route del local "$SERVICE_CIDR" dev lo table local 2>/dev/null || true
	ip route del local "$SERVICE_CIDR" dev lo 2>/dev/null || true
	nft delete table inet "$NFT_GUARD_TABLE" 2>/dev/null || true
	# kube-proxy (nftables mode) owns these two tables.
	nft delete table ip kube-proxy 2>/dev/null || true
	nft delete table ip6 kube-proxy 2>/dev/null || true
	remove_kube_iptables
	if [[ -f $STATE_DIR/ip_forward.orig ]]; then
		sysctl -qw net.ipv4.ip_forward="$(cat "$STATE_DIR/ip_forward.orig")" || true
	fi
}

# kubelet (its canary and KUBE-FIREWALL) and kube-proxy (clearing iptables
# mode at start) leave KUBE-* chains in the iptables-nft tables. Tables that
# did not exist before `up` go whole; in older ones only KUBE-* chains and the
# rules that jump to them.
remove_kube_iptables() {
	local family table tool chain rule
	while read -r _ family table; do
		[[ $family == ip || $family == ip6 ]] || continue
		if [[ -f $STATE_DIR/nft-tables.before ]] && ! grep -qxF "table $family $table" "$STATE_DIR/nft-tables.before"; then
			[[ $table == "$NFT_GUARD_TABLE" ]] || nft delete table "$family" "$table" 2>/dev/null || true
			continue
		fi
		tool=iptables
		[[ $family == ip6 ]] && tool=ip6tables
		command -v "$tool" >/dev/null || continue
		for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
			while read -r rule; do
				# shellcheck disable=SC2086 # a rule is a word list, as iptables -S prints it
				"$tool" -t "$table" -D ${rule#-A } 2>/dev/null || true
			done < <("$tool" -t "$table" -S 2>/dev/null | grep -E "^-A .* -j $chain( |$)" || true)
		done
		for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
			"$tool" -t "$table" -F "$chain" 2>/dev/null || true
			"$tool" -t "$table" -X "$chain" 2>/dev/null || true
		done
	done < <(nft list tables 2>/dev/null)
}

remove_host_paths() {
	local p
	# libcni caches every attachment in /var/lib/cni/results, whatever containerd's
	# config says: ours are named after our networks, and loopback ones by time.
	rm -f /var/lib/cni/results/lossless-ingest-node-*
	if [[ -f $STATE_DIR/nodes.count ]]; then
		find /var/lib/cni/results -maxdepth 1 -name 'cni-loopback-*' -newer "$STATE_DIR/nodes.count" -delete 2>/dev/null || true
	fi
	[[ -f $STATE_DIR/host-paths ]] || return 0
	while read -r p; do
		[[ -n $p && $p == /* ]] || continue
		# /run/netns may still be a mount point of its own; leave it if so.
		mountpoint -q "$p" && continue
		rm -rf --one-file-system "$p"
	done <"$STATE_DIR/host-paths"
}

remove_state_dir() {
	[[ -d $STATE_DIR ]] || return 0
	if awk -v d="$STATE_DIR/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
		die "mounts remain below $STATE_DIR; not deleting it (see: grep $STATE_DIR /proc/self/mountinfo)"
	fi
	rm -rf --one-file-system "$STATE_DIR"
}

cmd_down() {
	need_root
	local start
	start=$(now)
	# A live kubelet restarts what is killed under it: kubelets and kube-proxy first.
	step "stop kubelets, kube-proxy" stop_matching 'kubelet-*' kube-proxy
	step "kill containers and shims" kill_shims
	step "stop containerd, scheduler, controller-manager" stop_matching 'containerd-*' kube-scheduler kube-controller-manager
	# The API server before etcd: it shuts down cleanly only while etcd answers.
	step "stop kube-apiserver, etcd" eval 'stop_matching kube-apiserver; stop_matching etcd'
	kill_shims
	step "network namespaces, mounts, cgroups" eval 'delete_netns; unmount_state; remove_cgroups'
	step "bridges, routes, nft" remove_network
	remove_host_paths
	remove_state_dir
	log "cluster down in $(elapsed "$start")"
}
