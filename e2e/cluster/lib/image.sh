# shellcheck shell=bash
# `cluster image` / `cluster import`: images without a registry or a second
# (static) build. One layer holds the binary, the shared libraries ldd names
# and the dynamic loader at their host paths. Written twice: a docker-save tar
# for `ctr images import`, and an OCI archive for `skopeo copy oci-archive:`.

IMAGE_OUT_DEFAULT="$E2E_DIR/../target/images"
NONROOT_UID=65532

# image_copy_with_libs ROOTFS SRC DEST: SRC at DEST, plus what the loader needs.
image_copy_with_libs() {
	local rootfs=$1 src=$2 dest=$3 lib
	install -D -m 0755 "$src" "$rootfs$dest"
	# A static binary makes ldd exit 1 ("not a dynamic executable"): nothing to add.
	while read -r lib; do
		[[ -n $lib ]] || continue
		# -L: the file's bytes at the path the binary asks for (ld.so is a symlink on the host).
		mkdir -p "$rootfs$(dirname "$lib")"
		cp -L "$lib" "$rootfs$lib"
		chmod 0755 "$rootfs$lib"
	done < <(ldd "$src" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' || true)
}

# tar_dir DIR OUT: a reproducible tar of DIR's contents (sorted names without a
# leading ./, fixed times and owners), written atomically.
tar_dir() {
	local dir=$1 out=$2
	(cd "$dir" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort) |
		tar -C "$dir" --no-recursion --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out.tmp" -T -
	mv "$out.tmp" "$out"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

# build_image NAME:TAG BINARY OUTDIR [opts...]: prints the docker-save tar path.
build_image() {
	local ref=$1 binary=$2 out=$3
	shift 3
	local user=$NONROOT_UID entrypoint="" dest="" strip_debug=0 cmd=() env=("PATH=/usr/local/bin:/usr/bin:/bin") files=() f
	while (($#)); do
		case $1 in
		--user) user=$2; shift 2 ;;
		--entrypoint) entrypoint=$2; shift 2 ;;
		--dest) dest=$2; shift 2 ;;
		--strip-debug) strip_debug=1; shift ;;
		--cmd) cmd+=("$2"); shift 2 ;;
		--env) env+=("$2"); shift 2 ;;
		--file) files+=("$2"); shift 2 ;;
		*) die "image: unknown option $1" ;;
		esac
	done
	[[ $ref == *:* ]] || die "image: name must be NAME:TAG, got $ref"
	[[ -x $binary ]] || die "image: $binary is not an executable file"
	local name=${ref%:*} tag=${ref##*:}
	[[ -n $dest ]] || dest=/usr/local/bin/$(basename "$binary")
	[[ -n $entrypoint ]] || entrypoint=$dest

	local work rootfs
	work=$(mktemp -d)
	rootfs=$work/rootfs
	mkdir -p "$rootfs"/{tmp,etc} "$out"
	chmod 1777 "$rootfs/tmp"
	image_copy_with_libs "$rootfs" "$binary" "$dest"
	# A debug build is mostly DWARF: a test binary needs none of it in an image.
	((strip_debug)) && objcopy --strip-debug "$rootfs$dest"
	for f in "${files[@]}"; do
		if [[ $f == *:* ]]; then install -D -m 0644 "${f%%:*}" "$rootfs${f#*:}"; else install -D -m 0644 "$f" "$rootfs$f"; fi
	done
	# Enough of /etc for a libc lookup of the non-root user not to fail.
	printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
		"$NONROOT_UID" "$NONROOT_UID" >"$rootfs/etc/passwd"
	printf 'root:x:0:\nnonroot:x:%s:\n' "$NONROOT_UID" >"$rootfs/etc/group"

	tar_dir "$rootfs" "$work/layer.tar"
	local layer_sha
	layer_sha=$(sha256_of "$work/layer.tar")

	jq -n --arg diff "sha256:$layer_sha" --arg user "$user" --arg ep "$entrypoint" \
		--argjson cmd "$(printf '%s\n' "${cmd[@]}" | jq -R . | jq -s 'map(select(. != ""))')" \
		--argjson env "$(printf '%s\n' "${env[@]}" | jq -R . | jq -s 'map(select(. != ""))')" '{
		architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z",
		config: { User: $user, Entrypoint: [$ep], Cmd: $cmd, Env: $env, WorkingDir: "/" },
		rootfs: { type: "layers", diff_ids: [$diff] },
		history: [{ created: "1970-01-01T00:00:00Z", created_by: "lossless-ingest e2e image builder" }]
	}' >"$work/config.json"
	local config_sha
	config_sha=$(sha256_of "$work/config.json")

	local file=${name//\//_}_$tag
	# docker save layout: manifest.json naming the config and the layer tar.
	mkdir -p "$work/docker/$layer_sha"
	# Hard links: the layer may be hundreds of MB (a debug binary); tar reads it anyway.
	ln "$work/config.json" "$work/docker/$config_sha.json"
	ln "$work/layer.tar" "$work/docker/$layer_sha/layer.tar"
	jq -n --arg cfg "$config_sha.json" --arg ref "$ref" --arg layer "$layer_sha/layer.tar" \
		'[{ Config: $cfg, RepoTags: [$ref], Layers: [$layer] }]' >"$work/docker/manifest.json"
	tar_dir "$work/docker" "$out/$file.tar"

	# OCI image layout, archived: what `skopeo copy oci-archive:` reads.
	local blobs=$work/oci/blobs/sha256
	mkdir -p "$blobs"
	ln "$work/layer.tar" "$blobs/$layer_sha"
	ln "$work/config.json" "$blobs/$config_sha"
	jq -n --arg c "sha256:$config_sha" --argjson cs "$(size_of "$work/config.json")" \
		--arg l "sha256:$layer_sha" --argjson ls "$(size_of "$work/layer.tar")" '{
		schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
		config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs },
		layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls }]
	}' >"$work/manifest.json"
	local manifest_sha
	manifest_sha=$(sha256_of "$work/manifest.json")
	ln "$work/manifest.json" "$blobs/$manifest_sha"
	printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
	jq -n --arg m "sha256:$manifest_sha" --argjson ms "$(size_of "$work/manifest.json")" \
		--arg tag "$tag" --arg ref "$ref" '{
		schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
		manifests: [{ mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
			annotations: { "org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $ref } }]
	}' >"$work/oci/index.json"
	tar_dir "$work/oci" "$out/$file.oci.tar"

	rm -rf "$work"
	printf '%s\n' "$out/$file.tar"
}

cmd_image() {
	(($# >= 2)) || die "usage: cluster image NAME:TAG BINARY [--out DIR] [options]"
	local ref=$1 binary=$2 out=$IMAGE_OUT_DEFAULT args=()
	shift 2
	while (($#)); do
		case $1 in
		--out) out=$2; shift 2 ;;
		*) args+=("$1"); shift ;;
		esac
	done
	apt_ensure jq
	local tar
	tar=$(build_image "$ref" "$binary" "$out" "${args[@]}")
	log "image $ref: $tar (docker save), ${tar%.tar}.oci.tar (OCI archive)"
	printf '%s\n' "$tar"
}

# The sandbox image every pod starts with; containerd is configured to use it.
PAUSE_IMAGE=localhost/pause:local
pause_image_tar() { printf '%s/images/localhost_pause_local.tar' "$K8S_CACHE"; }

# Rebuilt at every `up` (well under a second), so it never lags the builder.
ensure_pause_image() {
	build_image "$PAUSE_IMAGE" "$(pause_bin)" "$K8S_CACHE/images" --user 65535 --dest /pause >/dev/null
}

node_names() {
	local d
	for d in "$STATE_DIR"/nodes/*/; do
		[[ -d $d ]] && basename "$d"
	done
}

ctr_node() {
	local node=$1
	shift
	ctr --address "$STATE_DIR/nodes/$node/containerd/containerd.sock" --namespace k8s.io "$@"
}

# import_into_node NODE TAR: load TAR into NODE's containerd (unpacked for CRI).
import_into_node() {
	ctr_node "$1" images import "$2" >>"$LOG_DIR/import.log" 2>&1 ||
		die "import of $2 into $1 failed (see $LOG_DIR/import.log)"
}

cmd_import() {
	(($#)) || die "usage: cluster import TAR..."
	local tar node nodes
	nodes=$(node_names)
	[[ -n $nodes ]] || die "no cluster is up (no nodes in $STATE_DIR/nodes)"
	for tar in "$@"; do
		[[ -f $tar ]] || die "no such image tar: $tar"
		for node in $nodes; do import_into_node "$node" "$tar"; done
		log "imported $(basename "$tar") into $(echo "$nodes" | tr '\n' ' ')"
	done
}
