#!/usr/bin/env bash
# Offline checks of charts/lossless-ingest (no cluster needed; CI runs it):
# the CRD copy is in sync, helm lint, helm template with default and
# non-default values, assertions on the rendered objects, and values that
# must be refused. The install/upgrade/uninstall on a real cluster is an e2e
# scenario.
#
#   bash charts/test.sh            HELM=/path/to/helm, PROMTOOL=/path/to/promtool to use others
set -euo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
CHART=$ROOT/charts/lossless-ingest
NON_DEFAULT=$CHART/ci/non-default-values.yaml
UPSTREAM='rtmp://origin.example.net:1935/{app}/{stream}'
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

failures=0
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok   %s\n' "$*"; }
bad() {
	printf '    FAIL %s\n' "$*" >&2
	failures=$((failures + 1))
}
indent() { sed 's/^/         /' >&2; }

# find_tool NAME BUILD: the path of a tool the e2e tooling builds (helm,
# promtool: pinned in e2e/versions.env, cached outside the repo), built by
# the build function BUILD, and only that, when the cache is cold.
find_tool() {
	local name=$1 build=$2 path
	path=$("$ROOT/e2e/cluster/cluster" paths | sed -n "s/^$name=//p")
	if [[ ! -x $path ]]; then
		step "$name not cached at $path: building it (Go module proxy, a few minutes)" >&2
		(
			# shellcheck disable=SC2034 # read by the sourced libraries
			E2E_DIR=$ROOT/e2e
			# shellcheck source=../e2e/cluster/lib/common.sh
			source "$E2E_DIR/cluster/lib/common.sh"
			# shellcheck source=../e2e/cluster/lib/build.sh
			source "$E2E_DIR/cluster/lib/build.sh"
			command -v go >/dev/null || die "go is required to build $name"
			"$build"
		) >&2
	fi
	printf '%s\n' "$path"
}

# HELM=/path or PROMTOOL=/path use those instead.
find_tools() {
	HELM=${HELM:-$(find_tool helm build_helm)}
	PROMTOOL=${PROMTOOL:-$(find_tool promtool build_promtool)}
	[[ -x $HELM ]] || { echo "no helm at '$HELM'" >&2; exit 1; }
	[[ -x $PROMTOOL ]] || { echo "no promtool at '$PROMTOOL'" >&2; exit 1; }
}

# The assertions parse YAML with PyYAML (Debian: python3-yaml).
ensure_pyyaml() {
	python3 -c 'import yaml' 2>/dev/null && return
	[[ $EUID -eq 0 ]] || { echo "python3-yaml is missing (apt-get install python3-yaml)" >&2; exit 1; }
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
}

# expect_refused NAME PATTERN HELM-ARGS...: helm must fail, naming PATTERN.
expect_refused() {
	local name=$1 pattern=$2 out
	shift 2
	if out=$("$HELM" "$@" 2>&1); then
		bad "$name: helm accepted it"
	elif grep -qE -- "$pattern" <<<"$out"; then
		ok "$name: refused with: $(grep -E -m1 -- "$pattern" <<<"$out" | sed 's/^[[:space:]]*//' | cut -c1-160)"
	else
		bad "$name: refused, but the message does not match /$pattern/:"
		indent <<<"$out"
	fi
}

find_tools
ensure_pyyaml
printf 'helm: %s (%s)\n' "$HELM" "$("$HELM" version --short)"
printf 'promtool: %s (%s)\n' "$PROMTOOL" "$("$PROMTOOL" --version 2>&1 | head -1)"

step "CRD copy: charts/lossless-ingest/files/crds/ is the generator's crds/ output"
if "$ROOT/charts/sync-crds.sh" --check; then ok "in sync"; else bad "out of sync (run charts/sync-crds.sh)"; fi

step "helm lint --strict (defaults + the required upstream; non-default values)"
if "$HELM" lint --strict "$CHART" --set-string "ingest.upstream=$UPSTREAM" >"$WORK/lint.log" 2>&1; then
	ok "defaults"
else
	bad "defaults"; indent <"$WORK/lint.log"
fi
if "$HELM" lint --strict "$CHART" -f "$NON_DEFAULT" >"$WORK/lint.log" 2>&1; then
	ok "ci/non-default-values.yaml"
else
	bad "ci/non-default-values.yaml"; indent <"$WORK/lint.log"
fi

step "helm template: defaults (namespace ingest) and ci/non-default-values.yaml (namespace ops)"
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" >"$WORK/default.yaml"
ok "defaults: $(grep -c '^kind:' "$WORK/default.yaml") objects"
"$HELM" template lossless "$CHART" -n ops -f "$NON_DEFAULT" >"$WORK/non-default.yaml"
ok "non-default: $(grep -c '^kind:' "$WORK/non-default.yaml") objects"

cat >"$WORK/check.py" <<'PY'
"""Assertions on a rendered chart. argv: rendered.yaml expectations-json crd-dir."""
import base64, glob, json, os, subprocess, sys, tempfile
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
exp = json.loads(sys.argv[2])
crd_dir = sys.argv[3]
failures = 0

def check(cond, what):
    global failures
    print(("    ok   " if cond else "    FAIL ") + what, file=sys.stdout if cond else sys.stderr)
    failures += 0 if cond else 1

def of(kind, ns=None):
    return [d for d in docs if d["kind"] == kind and (ns is None or d["metadata"].get("namespace") == ns)]

def matches(selector, labels):
    """A LabelSelector (matchLabels, matchExpressions In) against labels. An
    empty selector selects everything, which no check here wants: False."""
    ml, exprs = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    return bool(ml or exprs) and all(labels.get(k) == v for k, v in ml.items()) and all(
        e["operator"] == "In" and labels.get(e["key"]) in e["values"] for e in exprs)

rel_ns, namespaces = exp["releaseNamespace"], exp["namespaces"]
deploys = of("Deployment")
operator = [d for d in deploys if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
ingest = [d for d in deploys if d["metadata"]["labels"].get("app.kubernetes.io/component") == "ingest"]
check(len(operator) == 1 and operator[0]["metadata"]["namespace"] == rel_ns, f"one operator Deployment, in {rel_ns}")
check(sorted(d["metadata"]["namespace"] for d in ingest) == sorted(namespaces), f"one ingest Deployment in each of {namespaces}")
op = operator[0]
op_labels = op["spec"]["template"]["metadata"]["labels"]
op_c = op["spec"]["template"]["spec"]["containers"][0]
op_env = {e["name"]: e for e in op_c["env"]}
ing_labels = ingest[0]["spec"]["template"]["metadata"]["labels"]

print("  -- selectors")
for d in deploys:
    check(matches(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]),
          f"Deployment {d['metadata']['namespace']}/{d['metadata']['name']}: selector matches its pod template")
check(not matches(ingest[0]["spec"]["selector"], op_labels) and not matches(op["spec"]["selector"], ing_labels),
      "ingest and operator selectors do not overlap")
check(op["spec"]["replicas"] == exp["operatorReplicas"], f"operator replicas = {exp['operatorReplicas']}")
check(all(d["spec"]["replicas"] == exp["ingestReplicas"] for d in ingest), f"ingest replicas = {exp['ingestReplicas']}")
sel = dict(kv.split("=", 1) for kv in op_env["OPERATOR_INGEST_SELECTOR"]["value"].split(","))
check(matches({"matchLabels": sel}, ing_labels) and not matches({"matchLabels": sel}, op_labels),
      f"OPERATOR_INGEST_SELECTOR ({op_env['OPERATOR_INGEST_SELECTOR']['value']}) selects the ingest pods, not the operator")
check(op_env["OPERATOR_NAMESPACES"]["value"].split(",") == namespaces, f"OPERATOR_NAMESPACES = {','.join(namespaces)}")
check({"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"} ==
      {k: op_env[k]["valueFrom"]["fieldRef"]["fieldPath"] for k in ("POD_NAME", "POD_NAMESPACE")},
      "POD_NAME and POD_NAMESPACE from the downward API")
for pdb in of("PodDisruptionBudget"):
    targets = [d for d in deploys if d["metadata"]["namespace"] == pdb["metadata"]["namespace"]
               and matches(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    check(len(targets) == 1, f"PodDisruptionBudget {pdb['metadata']['namespace']}/{pdb['metadata']['name']} selects exactly one Deployment's pods")
check(any(p["spec"].get("minAvailable") == 1 and matches(p["spec"]["selector"], op_labels) for p in of("PodDisruptionBudget", rel_ns)),
      "operator PodDisruptionBudget minAvailable 1")
aff = op["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
want = exp["operatorAntiAffinity"]
got = ("preferred" if "preferredDuringSchedulingIgnoredDuringExecution" in aff else
       "required" if "requiredDuringSchedulingIgnoredDuringExecution" in aff else "none")
check(got == want, f"operator podAntiAffinity {want}")
if got == "preferred":
    term = aff["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    check(term["topologyKey"] == "kubernetes.io/hostname" and matches(term["labelSelector"], op_labels),
          "operator anti-affinity spreads its own pods across kubernetes.io/hostname")

print("  -- services")
services = of("Service")
def backing(svc):
    return [d for d in deploys if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
            and matches({"matchLabels": svc["spec"]["selector"]}, d["spec"]["template"]["metadata"]["labels"])]
def container_port(d, target):
    ports = d["spec"]["template"]["spec"]["containers"][0]["ports"]
    return next((p["containerPort"] for p in ports if target in (p["name"], p["containerPort"])), None)
for svc in services:
    b = backing(svc)
    check(len(b) == 1 and all(container_port(b[0], p["targetPort"]) for p in svc["spec"]["ports"]),
          f"Service {svc['metadata']['namespace']}/{svc['metadata']['name']} selects one Deployment and targets its ports")
rtmp = [s for s in services if s["spec"]["ports"][0]["name"] == "rtmp"]
check(sorted(s["metadata"]["namespace"] for s in rtmp) == sorted(namespaces), "an RTMP Service per ingest namespace")
check(all(s["spec"]["type"] == exp["serviceType"] for s in rtmp), f"RTMP Service type {exp['serviceType']}")
check(all(container_port(backing(s)[0], s["spec"]["ports"][0]["targetPort"]) == 1935 for s in rtmp), "RTMP Service targets container port 1935")
if exp["serviceType"] == "ClusterIP":
    check(all("externalTrafficPolicy" not in s["spec"] for s in rtmp), "no externalTrafficPolicy on a ClusterIP Service")
metrics = [s for s in services if backing(s) == [op] and s["spec"]["ports"][0]["port"] == 8080]
check(len(metrics) == 1, "operator metrics Service on port 8080")

print("  -- webhook")
vwcs = of("ValidatingWebhookConfiguration")
check(len(vwcs) == 1 and len(vwcs[0]["webhooks"]) == 1, "one ValidatingWebhookConfiguration with one webhook")
vwc = vwcs[0]
wh = vwc["webhooks"][0]
check("objectSelector" not in wh, "no objectSelector (never matches an Eviction)")
nss = wh.get("namespaceSelector", {}).get("matchExpressions", [])
check(nss == [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}],
      f"namespaceSelector: kubernetes.io/metadata.name In {namespaces}")
check(wh["failurePolicy"] == "Ignore", "failurePolicy Ignore")
check(wh["sideEffects"] == "NoneOnDryRun", "sideEffects NoneOnDryRun")
check(wh["matchPolicy"] == "Equivalent" and wh["admissionReviewVersions"] == ["v1"], "matchPolicy Equivalent, admissionReviewVersions [v1]")
check(wh["timeoutSeconds"] == exp["webhookTimeout"], f"timeoutSeconds {exp['webhookTimeout']}")
check(wh["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/eviction"], "scope": "Namespaced"}],
      "rule: CREATE pods/eviction only")
ref = wh["clientConfig"]["service"]
wsvc = [s for s in services if s["metadata"]["name"] == ref["name"] and s["metadata"]["namespace"] == ref["namespace"]]
check(len(wsvc) == 1 and backing(wsvc[0]) == [op] and
      any(p["port"] == ref["port"] == 443 and container_port(op, p["targetPort"]) == 8443 for p in wsvc[0]["spec"]["ports"]),
      "clientConfig names a Service that sends 443 to the operator's 8443 (every replica)")
dns = [f"{ref['name']}.{ref['namespace']}.svc", f"{ref['name']}.{ref['namespace']}.svc.cluster.local"]
tls_vol = next(v for v in op["spec"]["template"]["spec"]["volumes"] if v["name"] == "webhook-tls")
mounted_secret = tls_vol["secret"]["secretName"]
check(op_env["OPERATOR_WEBHOOK_CERT"]["value"].startswith(next(m["mountPath"] for m in op_c["volumeMounts"] if m["name"] == "webhook-tls")),
      "OPERATOR_WEBHOOK_CERT/KEY point into the mounted TLS Secret")
if exp["certManager"]:
    certs = of("Certificate", rel_ns)
    check("caBundle" not in wh["clientConfig"], "cert-manager mode: no chart caBundle")
    check(len(certs) == 1 and vwc["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from") == f"{rel_ns}/{certs[0]['metadata']['name']}",
          "cert-manager mode: cainjector annotation names the Certificate")
    check(certs[0]["spec"]["secretName"] == mounted_secret and certs[0]["spec"]["dnsNames"] == dns,
          f"cert-manager mode: the Certificate writes the mounted Secret, for {dns}")
    issuer = certs[0]["spec"]["issuerRef"]["name"]
    check(any(i["metadata"]["name"] == issuer for i in of("Issuer", rel_ns)), "cert-manager mode: its Issuer is rendered")
else:
    secret = next((s for s in of("Secret", rel_ns) if s["metadata"]["name"] == mounted_secret), None)
    check(secret is not None and {"tls.crt", "tls.key", "ca.crt"} <= set(secret["data"]), "the TLS Secret holds tls.crt, tls.key, ca.crt")
    check(wh["clientConfig"].get("caBundle") == secret["data"]["ca.crt"], "caBundle is the Secret's ca.crt")
    with tempfile.TemporaryDirectory() as t:
        for k in ("tls.crt", "ca.crt"):
            open(os.path.join(t, k), "wb").write(base64.b64decode(secret["data"][k]))
        v = subprocess.run(["openssl", "verify", "-CAfile", f"{t}/ca.crt", f"{t}/tls.crt"], capture_output=True, text=True)
        check(v.returncode == 0, "the serving certificate verifies against the caBundle (openssl verify)")
        san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", f"{t}/tls.crt"], capture_output=True, text=True).stdout
        check(all(f"DNS:{n}" in san for n in dns), f"the certificate names {dns}")

print("  -- control token and NetworkPolicy")
def token_secret(ns, name):
    return next((s for s in of("Secret", ns) if s["metadata"]["name"] == name), None)
def token_file(d, env):
    c = d["spec"]["template"]["spec"]["containers"][0]
    e = next(x["value"] for x in c["env"] if x["name"] == env)
    m = next(m for m in c["volumeMounts"] if e.startswith(m["mountPath"] + "/"))
    v = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"])
    item = next(i for i in v["secret"]["items"] if i["path"] == e[len(m["mountPath"]) + 1:])
    return v["secret"]["secretName"], item["key"]
name, key = token_file(op, "OPERATOR_CONTROL_TOKEN_FILE")
op_token = (token_secret(rel_ns, name) or {}).get("data", {}).get(key)
check(op_token is not None and len(base64.b64decode(op_token)) == 48, "operator mounts a 48-character control token")
for d in ingest:
    ns = d["metadata"]["namespace"]
    name, key = token_file(d, "INGEST_CONTROL_TOKEN_FILE")
    check((token_secret(ns, name) or {}).get("data", {}).get(key) == op_token, f"ingest pods in {ns} mount the same token")

print("  -- control API TLS")
tls = exp.get("controlTLS", {"mutual": True, "serverName": None})
def mounted(d, path):
    """The Secret name and key that `path` in `d`'s container comes from."""
    c = d["spec"]["template"]["spec"]["containers"][0]
    m = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    v = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"])
    return v["secret"]["secretName"], path[len(m["mountPath"]) + 1:]
def pem(d, path):
    name, key = mounted(d, path)
    s = token_secret(d["metadata"]["namespace"], name) or {}
    return base64.b64decode(s.get("data", {}).get(key, ""))
def env(d, name):
    c = d["spec"]["template"]["spec"]["containers"][0]
    return next((e["value"] for e in c["env"] if e["name"] == name), None)
server_name = env(op, "OPERATOR_CONTROL_TLS_SERVER_NAME")
check(env(op, "OPERATOR_CONTROL_TLS_CA") is not None and server_name is not None, "the operator verifies the pods' certificate, by name")
if tls["serverName"]:
    check(server_name == tls["serverName"], f"the server name is controlTLS.serverName ({server_name})")
check((env(op, "OPERATOR_CONTROL_TLS_CLIENT_CERT") is not None) == tls["mutual"], f"operator presents a client certificate: {tls['mutual']}")
with tempfile.TemporaryDirectory() as t:
    def write(name, data):
        open(os.path.join(t, name), "wb").write(data)
        return os.path.join(t, name)
    op_ca = write("op-ca.crt", pem(op, env(op, "OPERATOR_CONTROL_TLS_CA")))
    for d in ingest:
        ns = d["metadata"]["namespace"]
        check(env(d, "INGEST_CONTROL_TLS_CERT") is not None and env(d, "INGEST_CONTROL_TLS_KEY") is not None, f"ingest pods in {ns} serve the control API over TLS")
        check((env(d, "INGEST_CONTROL_TLS_CLIENT_CA") is not None) == tls["mutual"], f"ingest pods in {ns} require a client certificate: {tls['mutual']}")
        crt = write(f"{ns}.crt", pem(d, env(d, "INGEST_CONTROL_TLS_CERT")))
        v = subprocess.run(["openssl", "verify", "-CAfile", op_ca, crt], capture_output=True, text=True)
        check(v.returncode == 0, f"the certificate of the pods in {ns} verifies against the operator's CA (openssl verify)")
        san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", crt], capture_output=True, text=True).stdout
        check(f"DNS:{server_name}" in san, f"the certificate of the pods in {ns} names {server_name}")
        if tls["mutual"]:
            client = write("client.crt", pem(op, env(op, "OPERATOR_CONTROL_TLS_CLIENT_CERT")))
            pod_ca = write(f"{ns}-ca.crt", pem(d, env(d, "INGEST_CONTROL_TLS_CLIENT_CA")))
            v = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", pod_ca, client], capture_output=True, text=True)
            check(v.returncode == 0, f"the operator's client certificate verifies against the CA of the pods in {ns}")

nps = of("NetworkPolicy")
ingest_labels = ingest[0]["spec"]["template"]["metadata"]["labels"] if ingest else {}
if not exp["networkPolicy"]:
    check(not any(matches(p["spec"]["podSelector"], ingest_labels) for p in nps), "ingest NetworkPolicy off: none rendered")
for ns in namespaces if exp["networkPolicy"] else []:
    d = next(x for x in ingest if x["metadata"]["namespace"] == ns)
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    np_ = [p for p in nps if p["metadata"]["namespace"] == ns and matches(p["spec"]["podSelector"], pod_labels)]
    check(len(np_) == 1 and matches(np_[0]["spec"]["podSelector"], pod_labels) and not matches(np_[0]["spec"]["podSelector"], op_labels),
          f"{ns}: NetworkPolicy podSelector matches the rendered ingest pods (not the operator)")
    spec = np_[0]["spec"]
    check(spec["policyTypes"] == ["Ingress"], f"{ns}: NetworkPolicy governs Ingress")
    control = container_port(d, "control")
    rules = [r for r in spec["ingress"] if any(p["port"] in (control, "control") for p in r.get("ports", []))]
    check(len(rules) == 1 and control == 9090, f"{ns}: one ingress rule for the control port {control}")
    peers = rules[0].get("from", []) if rules else []
    check(peers != [] and all(matches(p.get("podSelector", {}), op_labels) and
                              matches(p.get("namespaceSelector", {}), {"kubernetes.io/metadata.name": rel_ns}) for p in peers),
          f"{ns}: the control port admits only the rendered operator pods (in {rel_ns})")
    check(all(r.get("ports") for r in spec["ingress"]), f"{ns}: every rule names its ports (none opens the control port by accident)")
    check({1935, 8080} <= {p["port"] for r in spec["ingress"] for p in r["ports"]}, f"{ns}: RTMP 1935 and HTTP 8080 allowed")

print("  -- operator NetworkPolicy")
op_nps = [p for p in nps if p["metadata"]["namespace"] == rel_ns and matches(p["spec"]["podSelector"], op_labels)]
check(len(op_nps) == 1 and not matches(op_nps[0]["spec"]["podSelector"], ingest_labels),
      f"one NetworkPolicy in {rel_ns} selects the operator pods (not the ingest pods)")
if op_nps:
    spec = op_nps[0]["spec"]
    check(spec["policyTypes"] == ["Ingress"], "operator NetworkPolicy governs Ingress")
    check(all(r.get("ports") for r in spec["ingress"]), "operator: every rule names its ports")
    by_port = {p["port"]: r.get("from", []) for r in spec["ingress"] for p in r["ports"]}
    check(set(by_port) == {8443, 8080}, f"operator: only the webhook (8443) and HTTP (8080) ports are open: {sorted(by_port)}")
    check(by_port.get(8443) == exp["webhookFrom"], f"operator: the webhook admits exactly {exp['webhookFrom'] or 'anyone'}")
    check(by_port.get(8080) == exp["metricsFrom"], f"operator: HTTP admits exactly {exp['metricsFrom']}")

print("  -- security context")
for d in deploys:
    pod = d["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), f"{d['metadata']['name']}: no host namespaces")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        eff = lambda k: sc.get(k, psc.get(k))
        good = (eff("runAsNonRoot") is True and (eff("runAsUser") or 0) > 0
                and sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", []) and not sc.get("capabilities", {}).get("add")
                and not sc.get("privileged") and (eff("seccompProfile") or {}).get("type") == "RuntimeDefault")
        check(good, f"{d['metadata']['namespace']}/{d['metadata']['name']}/{c['name']}: restricted (non-root uid {eff('runAsUser')}, read-only root, no escalation, drop ALL, RuntimeDefault)")
        check(all(k in c.get("resources", {}).get(kind, {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
              f"{d['metadata']['name']}/{c['name']}: cpu and memory requests and limits")

print("  -- ingest pod settings")
for d in ingest:
    pod = d["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    grace = pod["terminationGracePeriodSeconds"]
    deadline = float(env["INGEST_DRAIN_DEADLINE"]["value"].rstrip("s"))
    check(env["INGEST_GRACE_PERIOD"]["value"] == f"{grace}s" and grace == exp["grace"],
          f"{d['metadata']['namespace']}: INGEST_GRACE_PERIOD = terminationGracePeriodSeconds = {grace}s")
    check(0 < deadline < grace, f"{d['metadata']['namespace']}: INGEST_DRAIN_DEADLINE {deadline:g}s below the grace period")
    check(env["INGEST_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "INGEST_POD_NAME from the downward API")
    check(env["INGEST_UPSTREAM"]["value"] == exp["upstream"], f"INGEST_UPSTREAM = {exp['upstream']}")
    check(pod.get("automountServiceAccountToken") is False, "ingest pods get no API token")
    probes = pod["containers"][0]
    check(probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"} and
          probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"} and container_port(d, "http") == 8080,
          "readiness /readyz and liveness /healthz on port 8080")
    for s in ("INGEST_SIGNAL_GO_AWAY", "INGEST_SIGNAL_RECONNECT_REQUEST"):
        check(env[s]["value"] in ("true", "false"), f"{s} = {env[s]['value']}")

print("  -- RBAC")
roles = of("ClusterRole")
rules = [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in roles[0]["rules"]] if len(roles) == 1 else []
check(all("*" not in g + r + v for g, r, v in rules), "ClusterRole: no wildcards")
check(not any(res in ("secrets", "configmaps") for _, r, _ in rules for res in r), "ClusterRole: no Secrets or ConfigMaps")
granted = {(g, res, v) for gs, rs, vs in rules for g in gs for res in rs for v in vs}
sa = op["spec"]["template"]["spec"]["serviceAccountName"]
def bound(binding):
    return any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == rel_ns for s in binding["subjects"])
need = ({("", "nodes", v) for v in ("list", "watch")}
        | {("ingest.lossless.dev", "ingestdrains", v) for v in ("list", "watch", "create", "patch", "delete")}
        | {("ingest.lossless.dev", "ingestdrains/status", "patch")}
        | {("events.k8s.io", "events", v) for v in ("create", "patch")})
check(granted == need, "ClusterRole grants exactly what the operator uses cluster-wide: nodes list/watch, ingestdrains list/watch/create/patch/delete, status patch, events.k8s.io create/patch (no pods)")
pod_rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
             {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]}]
for ns in namespaces:
    pod_roles = [r for r in of("Role", ns) if r["rules"] == pod_rules]
    check(len(pod_roles) == 1 and any(bound(b) and b["roleRef"]["name"] == pod_roles[0]["metadata"]["name"] for b in of("RoleBinding", ns)),
          f"{ns}: pods list/watch and pods/eviction create by a Role bound to the operator")
check(any(bound(b) and b["roleRef"]["name"] == roles[0]["metadata"]["name"] for b in of("ClusterRoleBinding")), "ClusterRole bound to the operator's ServiceAccount")
lease_roles = [r for r in of("Role", rel_ns) if r["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]]
check(len(lease_roles) == 1 and any(bound(b) and b["roleRef"]["name"] == lease_roles[0]["metadata"]["name"] for b in of("RoleBinding", rel_ns)),
      f"leases get/create/update only in {rel_ns}, bound to the operator")

print("  -- CRD")
crds = of("CustomResourceDefinition")
if exp["crds"]:
    generated = {d["metadata"]["name"]: d for f in sorted(glob.glob(f"{crd_dir}/*.yaml")) for d in yaml.safe_load_all(open(f)) if d}
    check(sorted(c["metadata"]["name"] for c in crds) == sorted(generated), f"CRDs rendered: {sorted(generated)}")
    for c in crds:
        check(c["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", f"{c['metadata']['name']}: helm.sh/resource-policy keep")
        want = generated[c["metadata"]["name"]]
        check(c["spec"] == want["spec"] and c["apiVersion"] == want["apiVersion"], f"{c['metadata']['name']}: spec identical to the chart's copy of the generator output")
else:
    check(crds == [], "crds.install false: no CRD rendered")

sys.exit(1 if failures else 0)
PY

check_render() {
	local name=$1 file=$2 expect=$3
	step "assertions on the $name render"
	python3 "$WORK/check.py" "$file" "$expect" "$CHART/files/crds" || bad "$name render: see the FAIL lines above"
}

check_render defaults "$WORK/default.yaml" "$(printf '%s' '{
  "releaseNamespace": "ingest", "namespaces": ["ingest"], "operatorReplicas": 2, "ingestReplicas": 3,
  "operatorAntiAffinity": "preferred", "serviceType": "LoadBalancer", "networkPolicy": true,
  "webhookFrom": [], "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
  "certManager": false, "crds": true, "webhookTimeout": 5, "grace": 60}' |
	python3 -c 'import json,sys; e=json.load(sys.stdin); e["upstream"]=sys.argv[1]; print(json.dumps(e))' "$UPSTREAM")"
check_render non-default "$WORK/non-default.yaml" '{
  "releaseNamespace": "ops", "namespaces": ["ingest-a", "ingest-b"], "operatorReplicas": 3, "ingestReplicas": 5,
  "operatorAntiAffinity": "none", "serviceType": "ClusterIP", "networkPolicy": false,
  "webhookFrom": [{"ipBlock": {"cidr": "10.0.0.0/28"}}], "metricsFrom": [],
  "certManager": true, "crds": false, "webhookTimeout": 3, "grace": 120,
  "controlTLS": {"mutual": false, "serverName": "control.ingest.example.net"},
  "upstream": "rtmp://10.200.0.254:1935/{app}/{stream}"}'

step "variants: NodePort, one operator replica, webhook off"
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" \
	--set ingest.service.type=NodePort --set ingest.service.nodePort=31935 >"$WORK/nodeport.yaml"
if grep -q 'nodePort: 31935' "$WORK/nodeport.yaml" && grep -q 'type: NodePort' "$WORK/nodeport.yaml"; then
	ok "NodePort Service with a fixed node port"
else
	bad "NodePort Service with a fixed node port"
fi
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" --set operator.replicaCount=1 >"$WORK/one.yaml"
if ! grep -A8 '^kind: PodDisruptionBudget' "$WORK/one.yaml" | grep -q 'component: operator'; then
	ok "one operator replica: no operator PodDisruptionBudget (it would block node drains)"
else
	bad "one operator replica still renders an operator PodDisruptionBudget"
fi
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" --set webhook.enabled=false >"$WORK/nowebhook.yaml"
if ! grep -qE 'ValidatingWebhookConfiguration|OPERATOR_WEBHOOK_CERT|webhook-tls' "$WORK/nowebhook.yaml"; then
	ok "webhook off: no webhook configuration, Secret, Service or certificate mount"
else
	bad "webhook off still renders webhook objects"
fi

step "scraping: the ingest pods' PodMonitor and prometheus.io annotations"
if ! grep -qE '^kind: PodMonitor|prometheus.io/scrape' "$WORK/default.yaml"; then
	ok "off by default: no PodMonitor, no scrape annotations"
else
	bad "the default render has a PodMonitor or scrape annotations"
fi
"$HELM" template lossless "$CHART" -n ops --set-string "ingest.upstream=$UPSTREAM" --set 'ingest.namespaces={live-a,live-b}' \
	--set ingest.metrics.podMonitor.enabled=true --set ingest.metrics.podMonitor.labels.release=prom \
	--set ingest.metrics.prometheusAnnotations=true --set operator.metrics.prometheusAnnotations=true >"$WORK/scrape.yaml"
python3 - "$WORK/scrape.yaml" <<'PY' && ok "PodMonitor over both ingest namespaces on port http; annotations on ingest and operator pods" || bad "scrape render: see above"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
monitors = [d for d in docs if d["kind"] == "PodMonitor"]
assert len(monitors) == 1, monitors
m = monitors[0]
assert m["metadata"]["namespace"] == "ops" and m["metadata"]["labels"]["release"] == "prom", m["metadata"]
assert m["spec"]["namespaceSelector"]["matchNames"] == ["live-a", "live-b"], m["spec"]
assert m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ingest", m["spec"]
assert m["spec"]["podMetricsEndpoints"][0]["port"] == "http", m["spec"]
deployments = [d for d in docs if d["kind"] == "Deployment"]
assert len(deployments) == 3, [d["metadata"]["name"] for d in deployments]
for d in deployments:
    a = d["spec"]["template"]["metadata"]["annotations"]
    assert a["prometheus.io/scrape"] == "true" and a["prometheus.io/port"] == "8080", (d["metadata"]["name"], a)
    port = [p for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"] if p["name"] == "http"]
    assert port and port[0]["containerPort"] == 8080, port
PY

step "monitoring: the Grafana dashboard and the PrometheusRule (promtool check and unit tests)"
if ! grep -qE '^kind: PrometheusRule|grafana_dashboard' "$WORK/default.yaml"; then
	ok "off by default: no PrometheusRule, no dashboard ConfigMap"
else
	bad "the default render has a PrometheusRule or a dashboard ConfigMap"
fi
# Release x: the unit tests' series name the jobs a release x scrape gives.
"$HELM" template x "$CHART" -n ops --set-string "ingest.upstream=$UPSTREAM" \
	--set monitoring.grafanaDashboard.enabled=true --set monitoring.grafanaDashboard.namespace=monitoring \
	--set-string monitoring.grafanaDashboard.annotations.grafana_folder=Live \
	--set monitoring.prometheusRule.enabled=true --set monitoring.prometheusRule.labels.release=prom \
	--set monitoring.prometheusRule.additionalAlertLabels.team=video >"$WORK/monitoring.yaml"
# The rules as the unit tests expect them: default alert labels.
"$HELM" template x "$CHART" -n ops --set-string "ingest.upstream=$UPSTREAM" \
	--set monitoring.prometheusRule.enabled=true >"$WORK/rules.yaml"
mkdir -p "$WORK/promtool"
python3 - "$WORK/monitoring.yaml" "$WORK/promtool" "$WORK/rules.yaml" <<'PY' && ok "dashboard ConfigMap (sidecar label, folder, every panel queries) and PrometheusRule (labels on the rule and every alert)" || bad "monitoring render: see above"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = sys.argv[2]
maps = [d for d in docs if d["kind"] == "ConfigMap" and "lossless-ingest.json" in d.get("data", {})]
assert len(maps) == 1, [d["metadata"]["name"] for d in maps]
m = maps[0]["metadata"]
assert m["namespace"] == "monitoring" and m["labels"]["grafana_dashboard"] == "1", m
assert m["annotations"]["grafana_folder"] == "Live", m
dash = json.loads(maps[0]["data"]["lossless-ingest.json"])
assert dash["uid"] == "lossless-ingest", dash["uid"]
panels = [p for p in dash["panels"] if p["type"] != "row"]
ids = [p["id"] for p in dash["panels"]]
assert len(ids) == len(set(ids)), ids
exprs = []
for p in panels:
    assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    exprs += [t["expr"] for t in p["targets"]]
# Every query as a recording rule, for promtool to parse (Grafana's
# variables replaced by what they expand to).
records = [{"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "2m").replace("$namespace", ".*")}
           for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}, open(f"{out}/dashboard.rules.yaml", "w"))
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(rules) == 1, rules
r = rules[0]
assert r["metadata"]["namespace"] == "ops" and r["metadata"]["labels"]["release"] == "prom", r["metadata"]
alerts = [a for g in r["spec"]["groups"] for a in g["rules"]]
assert len(alerts) == 7, [a["alert"] for a in alerts]
for a in alerts:
    assert a["labels"]["team"] == "video" and a["labels"]["severity"] in ("critical", "warning"), a
    assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
plain = [d for d in yaml.safe_load_all(open(sys.argv[3])) if d and d["kind"] == "PrometheusRule"]
yaml.safe_dump({"groups": plain[0]["spec"]["groups"]}, open(f"{out}/alerts.rules.yaml", "w"), width=10000)
PY
cp "$ROOT/charts/monitoring-tests/alerts.test.yaml" "$WORK/promtool/"
if "$PROMTOOL" check rules "$WORK/promtool/alerts.rules.yaml" "$WORK/promtool/dashboard.rules.yaml" >"$WORK/promtool.log" 2>&1; then
	ok "promtool check rules: the alerts and every dashboard query parse ($(grep -o '[0-9]* rules found' "$WORK/promtool.log" | paste -sd, -))"
else
	bad "promtool check rules"; indent <"$WORK/promtool.log"
fi
if "$PROMTOOL" test rules "$WORK/promtool/alerts.test.yaml" >"$WORK/promtool.log" 2>&1; then
	ok "promtool test rules: every alert fires and stays quiet where it should (charts/monitoring-tests/alerts.test.yaml)"
else
	bad "promtool test rules"; indent <"$WORK/promtool.log"
fi

step "GitOps: with existing Secrets, renders need no lookup and are byte-identical"
gitops=(--set-string "ingest.upstream=$UPSTREAM" --set controlToken.existingSecret=ingest-control-token
	--set webhook.tls.existingSecret=ingest-webhook-tls --set-string webhook.tls.caBundle=LS0tLS1CRUdJTg==
	--set controlTLS.existingSecrets.server=ingest-control-tls --set controlTLS.existingSecrets.client=ingest-control-client-tls)
"$HELM" template lossless "$CHART" -n ingest "${gitops[@]}" >"$WORK/gitops-1.yaml"
"$HELM" template lossless "$CHART" -n ingest "${gitops[@]}" >"$WORK/gitops-2.yaml"
if cmp -s "$WORK/gitops-1.yaml" "$WORK/gitops-2.yaml"; then ok "two renders are byte-identical"; else bad "two renders differ"; fi
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" >"$WORK/generated-2.yaml"
if ! cmp -s "$WORK/default.yaml" "$WORK/generated-2.yaml"; then
	ok "without them each render generates new secrets (what the existing-Secret values are for)"
else
	bad "two renders with generated secrets are identical: the check above proves nothing"
fi
if ! grep -qE '^kind: Secret' "$WORK/gitops-1.yaml" && ! grep -q 'checksum/' "$WORK/gitops-1.yaml"; then
	ok "no Secret rendered and no checksum annotation that could roll the pods"
else
	bad "the GitOps render still renders a Secret or a checksum annotation"
fi
if grep -q 'secretName: ingest-control-token' "$WORK/gitops-1.yaml" && grep -q 'secretName: ingest-webhook-tls' "$WORK/gitops-1.yaml" \
	&& grep -q 'caBundle: LS0tLS1CRUdJTg==' "$WORK/gitops-1.yaml"; then
	ok "the pods mount the existing Secrets; the webhook carries the given caBundle"
else
	bad "the existing Secrets or the caBundle are not used"
fi

step "control API TLS: off, existing Secrets, cert-manager"
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" --set controlTLS.enabled=false >"$WORK/plain.yaml"
if ! grep -q 'CONTROL_TLS' "$WORK/plain.yaml" && ! grep -q 'control-tls' "$WORK/plain.yaml"; then
	ok "controlTLS.enabled=false: no certificate, no TLS settings"
else
	bad "controlTLS.enabled=false still renders TLS settings"
fi
if grep -q 'secretName: ingest-control-tls$' "$WORK/gitops-1.yaml" && grep -q 'secretName: ingest-control-client-tls$' "$WORK/gitops-1.yaml"; then
	ok "GitOps render: the pods and the operator mount the existing control TLS Secrets"
else
	bad "GitOps render: the existing control TLS Secrets are not mounted"
fi
"$HELM" template lossless "$CHART" -n ingest --set-string "ingest.upstream=$UPSTREAM" --set 'ingest.namespaces={a,b}' \
	--set controlTLS.certManager.enabled=true --set controlTLS.certManager.issuerRef.name=ingest-ca >"$WORK/cm.yaml"
n=$(python3 -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
certs = [d for d in docs if d["kind"] == "Certificate" and d["spec"]["issuerRef"]["name"] == "ingest-ca"]
print(sorted(c["metadata"]["namespace"] + "/" + ",".join(c["spec"]["usages"]) for c in certs))' "$WORK/cm.yaml")
if [[ $n == "['a/digital signature,key encipherment,server auth', 'b/digital signature,key encipherment,server auth', 'ingest/digital signature,key encipherment,client auth']" ]]; then
	ok "cert-manager: a serving Certificate per ingest namespace and the operator's client Certificate, from the given issuer"
else
	bad "cert-manager Certificates: $n"
fi

step "values that must be refused"
expect_refused "controlTLS.certManager without an issuer" "issuerRef.name is required" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set controlTLS.certManager.enabled=true
expect_refused "controlTLS.existingSecrets with only one of them" "give both server and client" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set controlTLS.existingSecrets.server=s
expect_refused "webhook.tls.existingSecret without its caBundle" "webhook.tls.caBundle is required" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set webhook.tls.existingSecret=tls
printf 'ingest:\n  replicaCont: 2\n' >"$WORK/typo.yaml"
expect_refused "typo ingest.replicaCont (template)" "replicaCont" template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" -f "$WORK/typo.yaml"
expect_refused "typo ingest.replicaCont (lint)" "replicaCont" lint "$CHART" --set-string "ingest.upstream=$UPSTREAM" -f "$WORK/typo.yaml"
expect_refused "typo at the top level (operatr)" "operatr" template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set operatr.replicaCount=2
expect_refused "wrong type (operator.replicaCount=two)" "replicaCount" template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set-string operator.replicaCount=two
expect_refused "failurePolicy outside its enum" "failurePolicy" template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set webhook.failurePolicy=Deny
expect_refused "empty upstream" "ingest.upstream is required" template x "$CHART"
expect_refused "a duration without a unit (propagationDelay=5)" "propagationDelay" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set-string ingest.drain.propagationDelay=5
expect_refused "drain deadline not below the grace period" "must be below ingest.terminationGracePeriodSeconds" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set ingest.drain.deadlineSeconds=60
expect_refused "nodePort with two ingest namespaces" "node ports are cluster-wide" \
	template x "$CHART" --set-string "ingest.upstream=$UPSTREAM" --set 'ingest.namespaces={a,b}' --set ingest.service.nodePort=31935

step "helm package leaves out the test values (ci/)"
"$HELM" package "$CHART" -d "$WORK" >/dev/null
if tar -tzf "$WORK"/lossless-ingest-*.tgz | grep -q '/ci/'; then bad "ci/ is packaged"; else ok "ci/ not packaged"; fi

echo
if ((failures)); then
	echo "charts/test.sh: $failures check(s) failed" >&2
	exit 1
fi
echo "charts/test.sh: all checks passed"
