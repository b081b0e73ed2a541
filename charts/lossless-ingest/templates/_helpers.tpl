{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "lossless-ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name + chart name, unless the release name already holds
the chart name. Truncated to 63 characters (DNS label) with room for the
longest suffix used below.
*/}}
{{- define "lossless-ingest.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "lossless-ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "lossless-ingest.labels" -}}
helm.sh/chart: {{ include "lossless-ingest.chart" . }}
{{ include "lossless-ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lossless-ingest
{{- end }}

{{/*
Labels that identify this release's objects (no component).
*/}}
{{- define "lossless-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lossless-ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Operator: names and labels. */}}
{{- define "lossless-ingest.operator.fullname" -}}
{{ include "lossless-ingest.fullname" . }}-operator
{{- end }}

{{- define "lossless-ingest.operator.selectorLabels" -}}
{{ include "lossless-ingest.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lossless-ingest.operator.labels" -}}
{{ include "lossless-ingest.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lossless-ingest.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "lossless-ingest.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Webhook: names and labels. */}}
{{- define "lossless-ingest.webhook.fullname" -}}
{{ include "lossless-ingest.fullname" . }}-webhook
{{- end }}

{{- define "lossless-ingest.webhook.labels" -}}
{{ include "lossless-ingest.labels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{- define "lossless-ingest.webhook.tlsSecretName" -}}
{{ .Values.webhook.tls.existingSecret | default (printf "%s-tls" (include "lossless-ingest.webhook.fullname" .)) }}
{{- end }}

{{/* DNS names of the webhook Service, the names its certificate must hold. */}}
{{- define "lossless-ingest.webhook.dnsNames" -}}
{{- $svc := include "lossless-ingest.webhook.fullname" . }}
{{- list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) | toJson }}
{{- end }}

{{/* Ingest tier: names and labels. */}}
{{- define "lossless-ingest.ingest.fullname" -}}
{{ include "lossless-ingest.fullname" . }}-ingest
{{- end }}

{{- define "lossless-ingest.ingest.selectorLabels" -}}
{{ include "lossless-ingest.selectorLabels" . }}
app.kubernetes.io/component: ingest
{{- end }}

{{- define "lossless-ingest.ingest.labels" -}}
{{ include "lossless-ingest.labels" . }}
app.kubernetes.io/component: ingest
{{- end }}

{{/*
The ingest pods' selector labels as a label selector string
(OPERATOR_INGEST_SELECTOR), sorted by key.
*/}}
{{- define "lossless-ingest.ingest.selector" -}}
{{- $labels := include "lossless-ingest.ingest.selectorLabels" . | fromYaml }}
{{- $pairs := list }}
{{- range $k := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (index $labels $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
Namespaces of the ingest tier, as a JSON list: ingest.namespaces, or the
release namespace. Use with `include ... | fromJsonArray`.
*/}}
{{- define "lossless-ingest.ingest.namespaces" -}}
{{- default (list .Release.Namespace) .Values.ingest.namespaces | uniq | toJson }}
{{- end }}

{{- define "lossless-ingest.controlTokenSecretName" -}}
{{ .Values.controlToken.existingSecret | default (printf "%s-control-token" (include "lossless-ingest.fullname" .)) }}
{{- end }}

{{/* Control API TLS: the Secrets with the pods' and the operator's certificates. */}}
{{- define "lossless-ingest.controlTLS.serverSecretName" -}}
{{ .Values.controlTLS.existingSecrets.server | default (printf "%s-control-tls" (include "lossless-ingest.fullname" .)) }}
{{- end }}

{{- define "lossless-ingest.controlTLS.clientSecretName" -}}
{{ .Values.controlTLS.existingSecrets.client | default (printf "%s-control-client-tls" (include "lossless-ingest.fullname" .)) }}
{{- end }}

{{/* The one DNS name every ingest pod's control certificate carries. */}}
{{- define "lossless-ingest.controlTLS.serverName" -}}
{{ .Values.controlTLS.serverName | default (printf "%s-control.%s.svc" (include "lossless-ingest.ingest.fullname" .) .Release.Namespace) }}
{{- end }}

{{- define "lossless-ingest.controlTLSDir" -}}
/var/run/secrets/ingest-control-tls
{{- end }}

{{/* Where both the ingest pods and the operator find the control token. */}}
{{- define "lossless-ingest.controlTokenDir" -}}
/var/run/secrets/ingest-control
{{- end }}

{{/*
Image reference from an image block: repository:tag, or repository@digest.
*/}}
{{- define "lossless-ingest.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (required "image tag or digest is required" (toString .tag)) }}
{{- end }}
{{- end }}

{{/*
Default podAntiAffinity across nodes for a component: (dict "mode" preferred|required|none "labels" selectorLabelsYaml).
*/}}
{{- define "lossless-ingest.podAntiAffinity" -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (fromYaml .labels)) }}
{{- if eq .mode "preferred" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        {{- toYaml $term | nindent 8 }}
{{- else if eq .mode "required" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    {{- toYaml (list $term) | nindent 4 }}
{{- end }}
{{- end }}

{{/*
Seconds of the ingest pods' SIGTERM drain deadline: ingest.drain.deadlineSeconds,
or the grace period minus a sixth of it (at least 5 s). Always below the grace period.
*/}}
{{- define "lossless-ingest.ingest.drainDeadlineSeconds" -}}
{{- $grace := int .Values.ingest.terminationGracePeriodSeconds }}
{{- $deadline := 0 }}
{{- if kindIs "invalid" .Values.ingest.drain.deadlineSeconds }}
{{- $deadline = max 1 (sub $grace (max 5 (div $grace 6))) }}
{{- else }}
{{- $deadline = int .Values.ingest.drain.deadlineSeconds }}
{{- end }}
{{- if ge $deadline $grace }}
{{- fail (printf "ingest.drain.deadlineSeconds (%d) must be below ingest.terminationGracePeriodSeconds (%d), so relays can flush before the pod is killed" $deadline $grace) }}
{{- end }}
{{- $deadline }}
{{- end }}
